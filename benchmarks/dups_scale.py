"""`instret dups` at scale: 100,000 and 1,000,000 synthetic vectors, time and peak memory.

    python benchmarks/dups_scale.py [--sizes 100000,1000000] [--planted 0.01] [--seed 0]

For each size an index folder is written as `instret index` writes one (metadata, vectors,
FAISS index, score distributions), from synthetic 128-d vectors of low intrinsic dimension
(the index sizing benchmark's), plus a near copy (cosine about 0.995) of `--planted` of them.
The 100,000 index is Flat (exhaustive), the 1,000,000 one IVF4096,Flat searched with the
default nprobe, as "Choosing an index type" advises. Then `find_duplicates` runs
in a fresh process, so that its peak resident memory (VmHWM) is its own: the time, the peak,
the vectors' own size for scale, and the share of planted pairs found. The last stdout line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic(n: int, planted: float, seed: int) -> tuple[np.ndarray, int]:
    """n unit vectors of low intrinsic dimension (index_sizing.clustered: clusters in a 16-d
    latent space, as learned features are); the last `planted` share are near copies of the
    first ones (cosine about 0.995 with them: clear copies, so that the run goes through
    grouping and reporting as a collection with copies does)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from index_sizing import clustered

    copies = int(n * planted)
    x = np.empty((n, 128), np.float32)
    x[: n - copies] = clustered(n - copies, seed)
    noise = np.random.default_rng(seed).standard_normal((copies, 128)).astype(np.float32)
    x[n - copies :] = x[:copies] + 0.1 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, copies


def write_index(folder: Path, n: int, planted: float, seed: int) -> int:
    from instret.calibration import unrelated_distribution
    from instret.encoder import Encoder, save_encoder
    from instret.index import make_manifest, write_generation

    vectors, copies = synthetic(n, planted, seed)
    ids = np.arange(n, dtype=np.int64)
    files = [(i, f"img-{i:07d}.jpg", 1000, 10**18 + i, f"{i:064x}") for i in range(n)]
    scores = unrelated_distribution(vectors, seed)  # as `instret index` measures it
    factory = "Flat" if n <= 200_000 else "IVF4096,Flat"
    manifest = make_manifest(
        vectors,
        factory,
        "synthetic",
        "small",
        32,
        folder / "images",
        0,
        extra={"postprocess": {"whiten": False}, "scores": scores},
    )
    encoder = folder / "encoder.pt"
    save_encoder(Encoder("small", 128, 32), encoder, (0.5,) * 3, (0.25,) * 3)
    (folder / "index").mkdir(parents=True)
    write_generation(folder / "index", 1, manifest, vectors, ids, files, [], encoder)
    return copies


def measure(index: str, copies: int, n: int) -> dict:
    """In this (fresh) process: find_duplicates, its time and this process's peak memory."""
    from instret.duplicates import find_duplicates

    imported = rss_mb("VmRSS")  # python, torch and faiss alone
    start = time.perf_counter()
    found = find_duplicates(index)
    seconds = time.perf_counter() - start
    planted = {(i, n - copies + i) for i in range(copies)}
    pairs = set()
    for g in found["groups"]:
        rows = sorted(int(Path(m["path"]).stem.split("-")[1]) for m in g["members"])
        pairs |= {(a, b) for k, a in enumerate(rows) for b in rows[k + 1 :]}
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(rss_mb("VmHWM")),
        "imports_mb": round(imported),
        "threshold": found["threshold"],
        "groups": len(found["groups"]),
        "planted_found": round(len(pairs & planted) / max(1, copies), 4),
        "pairs_not_planted": len(pairs - planted),
    }


def rss_mb(field: str) -> float:
    """VmHWM: this process's peak resident memory; VmRSS: its present one."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--planted", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # INDEX COPIES N: the child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]), int(args.measure[2]))))
        return
    results = []
    for n in map(int, args.sizes.split(",")):
        work = Path(tempfile.mkdtemp(prefix="instret-dups-scale-"))
        try:
            start = time.perf_counter()
            copies = write_index(work, n, args.planted, args.seed)
            setup = time.perf_counter() - start
            child = subprocess.run(
                [sys.executable, __file__, "--measure", str(work / "index"), str(copies), str(n)],
                capture_output=True,
                text=True,
            )
            if child.returncode != 0:
                sys.exit(f"dups_scale: find_duplicates failed on {n} vectors:\n{child.stderr}")
            row = {
                "vectors": n,
                "planted": copies,
                "vectors_mb": round(n * 128 * 4 / 2**20),
                "setup_seconds": round(setup, 1),
                **json.loads(child.stdout.strip().splitlines()[-1]),
            }
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.append(row)
        print(
            f"{n:>9,} vectors ({row['vectors_mb']} MB): dups {row['seconds']} s, peak {row['peak_rss_mb']} MB "
            f"({row['imports_mb']} MB of it the imports), "
            f"threshold {row['threshold']:.4f}, planted pairs found {row['planted_found']:.3f}, "
            f"other pairs {row['pairs_not_planted']}",
            flush=True,
        )
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
