"""Choosing an index type: size, build time, query latency and recall@10 at 1 M and 10 M vectors.

    python benchmarks/index_sizing.py [--rows 1000000 10000000] [--skip HNSW32@10000000]

Synthetic 128-d unit vectors of low intrinsic dimension (1,000 clusters in a 16-d latent
space, mapped to 128-d: learned features are like that, uniform noise is not), the index built through instret's own FAISS code (`make_faiss_index`: trained
on a sample of 100,000, searched with instret's default nprobe 16 / efSearch 64). For each
row count and layout it prints one JSON line: build seconds, bytes per vector (the serialised
index), single-query latency p50 (ms, one thread per query, as `instret query` runs), and
recall@10 against exact search over 200 queries. The the sizing table in benchmarks/README.md is this output.
Memory: the 10 M rows take 5.1 GB as float32, plus the index (another 5.1 GB for Flat).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instret.faiss_boundary import make_faiss_index, set_search_breadth

LAYOUTS = ["Flat", "IVF4096,Flat", "IVF4096,PQ16", "HNSW32"]
DIM, LATENT, CENTRES, QUERIES = 128, 16, 1_000, 200


def clustered(rows: int, seed: int = 0, chunk: int = 1_000_000) -> np.ndarray:
    """Unit vectors of low intrinsic dimension, like learned features: a mixture of CENTRES
    clusters in a 16-d latent space, mapped linearly to 128-d, plus a little noise."""
    rng = np.random.default_rng(0)  # centres and map shared by the data and the queries
    centres = rng.normal(size=(CENTRES, LATENT)).astype(np.float32)
    mix = rng.normal(size=(LATENT, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    out = np.empty((rows, DIM), dtype=np.float32)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        z = centres[rng.integers(0, CENTRES, n)] + 0.5 * rng.normal(size=(n, LATENT)).astype(np.float32)
        x = z @ mix + 0.1 * rng.normal(size=(n, DIM)).astype(np.float32)
        out[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def measure(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, layout: str) -> dict:
    import faiss

    t = time.perf_counter()
    index = make_faiss_index(x, np.arange(len(x), dtype=np.int64), layout)
    build = time.perf_counter() - t
    set_search_breadth(index)
    with tempfile.TemporaryDirectory() as tmp:  # the size on disk, as `instret index` writes it
        faiss.write_index(index, f"{tmp}/index.faiss")
        size = os.path.getsize(f"{tmp}/index.faiss")
    faiss.omp_set_num_threads(1)
    times = []
    found = np.empty((len(queries), 10), dtype=np.int64)
    for i, q in enumerate(queries):
        t = time.perf_counter()
        found[i] = index.search(q[None], 10)[1][0]
        times.append(time.perf_counter() - t)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    recall = np.mean([len(set(found[i]) & set(truth[i])) / 10 for i in range(len(queries))])
    return {
        "rows": len(x),
        "layout": layout,
        "build_s": round(build, 1),
        "bytes_per_vector": round(size / len(x), 1),
        "query_p50_ms": round(float(np.median(times)) * 1000, 2),
        "recall_at_10": round(float(recall), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--layouts", nargs="+", default=LAYOUTS)
    parser.add_argument("--skip", nargs="*", default=["HNSW32@10000000"], help="LAYOUT@ROWS pairs not to run.")
    args = parser.parse_args()
    import faiss

    for rows in args.rows:
        x = clustered(rows)
        queries = clustered(QUERIES, seed=1)
        exact = faiss.IndexFlatIP(DIM)
        exact.add(x)
        truth = exact.search(queries, 10)[1]
        del exact
        for layout in args.layouts:
            if f"{layout}@{rows}" in args.skip:
                print(json.dumps({"rows": rows, "layout": layout, "skipped": "see --skip"}), flush=True)
                continue
            print(json.dumps(measure(x, queries, truth, layout)), flush=True)


if __name__ == "__main__":
    main()
