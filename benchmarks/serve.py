"""Serving benchmark: end-to-end HTTP latency of an image upload to `instret serve`.

    python benchmarks/serve.py [--model RUN_DIR] [--cifar DIR] [--imagenette DIR] [--requests 200]

For each collection (CIFAR-10 train+test, 60,000 images; Imagenette val, 3,925 photos) the index
is built and `instret serve` started (seconds until it answers); then POST /api/v1/search with
an image file's bytes (decode, embed, search, k=10), from one client and from eight at once:
p50 and p95 latency and requests per second. In the same run, for comparison: the same searches
in-process (Searcher, no HTTP: what HTTP adds) and a cold `instret query` process per image
(what a warm server saves). Also the start-up of `instret --help`, `info` and `env` beside
`import torch`. Without --model an untrained encoder of the kind `instret train` makes on a
CPU (small, 32 px) is used: latency does not depend on the weights. The last line on stdout is
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.server_process: the same server harness

from instret.encoder import Encoder, save_encoder
from instret.images import list_image_files
from instret.indexer import build_index
from instret.searcher import Searcher
from tests.server_process import Server

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CLIENTS = 8


def say(msg: str) -> None:
    print(msg, flush=True)


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def upload_latencies(server: Server, uploads: list[bytes], clients: int) -> tuple[list[float], float]:
    """(each request's ms, requests per second) with `clients` clients sharing the uploads."""

    def post(data: bytes) -> float:
        def one():
            status, _, body = server.request("POST", "/api/v1/search?k=10", data)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:200]!r}")

        return timed(one)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        ms = list(pool.map(post, uploads))
    return ms, len(uploads) / (time.perf_counter() - start)


def process_seconds(argv: list[str], runs: int) -> float:
    """Median wall seconds of a fresh process running argv."""
    ms = [timed(lambda: subprocess.run(argv, check=True, capture_output=True)) for _ in range(runs)]
    return float(np.median(ms)) / 1000


def bench_collection(name: str, folder: str, model: Path, requests: int, repeats: int, tmp: Path) -> dict:
    paths = list_image_files(folder)
    index_dir = tmp / f"{name}-index"
    start = time.perf_counter()
    build_index(folder, model, index_dir, workers=2, device="cpu")
    say(f"[{name}] {len(paths)} images indexed in {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(0)
    sample = [paths[i] for i in rng.choice(len(paths), min(requests, len(paths)), replace=False)]
    uploads = [p.read_bytes() for p in sample]

    searcher = Searcher(index_dir)
    search = lambda data: searcher.query_decoded(*searcher.decode_uploads([("q", data)]), k=10)  # what the server runs
    search(uploads[0])  # warm
    in_process = [timed(lambda d=d: search(d)) for d in uploads]
    say(f"[{name}] in-process (no HTTP): {percentiles(in_process)}")

    start = time.perf_counter()
    server = Server(index_dir)
    ready = time.perf_counter() - start
    try:
        upload_latencies(server, uploads[:5], 1)  # warm
        one_ms, one_rps = upload_latencies(server, uploads, 1)
        many_ms, many_rps = upload_latencies(server, uploads * 2, CLIENTS)
    finally:
        server.stop()
    one = {**percentiles(one_ms), "requests_per_s": round(one_rps, 1)}
    many = {**percentiles(many_ms), "requests_per_s": round(many_rps, 1)}
    say(f"[{name}] server ready in {ready:.1f} s; 1 client: {one}; {CLIENTS} clients: {many}")
    cold = process_seconds(["instret", "query", str(sample[0]), "--index", str(index_dir)], repeats)
    say(f"[{name}] cold `instret query`: {cold:.2f} s, {cold * 1000 / one['p50_ms']:.0f}x the served p50")
    return {
        "images": len(paths),
        "query_bytes_median": int(np.median([len(d) for d in uploads])),
        "server_ready_s": round(ready, 2),
        "one_client": one,
        f"{CLIENTS}_clients": many,
        "in_process": percentiles(in_process),
        "http_overhead_p50_ms": round(one["p50_ms"] - percentiles(in_process)["p50_ms"], 2),
        "cold_query_s": round(cold, 2),
        "cold_over_served_p50": round(cold * 1000 / one["p50_ms"], 1),
    }


def startup_seconds(index_dir: Path, repeats: int) -> dict:
    """Median wall seconds of each command, in fresh processes, beside importing torch."""
    commands = {
        "instret --help": ["instret", "--help"],
        "instret info": ["instret", "info", str(index_dir)],
        "instret env": ["instret", "env"],
        "import torch": [sys.executable, "-c", "import torch"],
    }
    out = {name: round(process_seconds(argv, repeats), 2) for name, argv in commands.items()}
    say(f"start-up seconds: {out}")
    return out


def untrained_encoder(tmp: Path) -> Path:
    path = tmp / "encoder.pt"
    save_encoder(Encoder("small", 128, 32).eval(), path, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="encoder.pt or a run folder [an untrained small 32 px encoder]")
    ap.add_argument("--cifar", default=str(SHARED / "cifar10"))
    ap.add_argument("--imagenette", default=str(SHARED / "imagenette2" / "val"))
    ap.add_argument("--requests", type=int, default=200, help="uploads per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each cold process timed (the median is kept)")
    args = ap.parse_args()
    collections = {"cifar10": args.cifar, "imagenette": args.imagenette}
    for folder in collections.values():
        if not Path(folder).is_dir():
            sys.exit(f"serve benchmark: data folder {folder} not found (pass --cifar / --imagenette)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else untrained_encoder(tmp)
        results = {
            name: bench_collection(name, folder, model, args.requests, args.repeats, tmp)
            for name, folder in collections.items()
        }
        results["startup_s"] = startup_seconds(tmp / "cifar10-index", args.repeats)
    print(json.dumps({"model": str(args.model or "untrained small, 32 px"), "results": results}))


if __name__ == "__main__":
    main()
