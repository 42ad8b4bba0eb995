"""Search benchmark: index build speed, query latency, retrieval quality, incremental updates.

    python benchmarks/search.py --model RUN_DIR [--cifar DIR] [--imagenette DIR]

For each collection (CIFAR-10 train+test, 60,000 images; Imagenette val, 3,925 photos):
index build images/s against pure encoder forward images/s on the same decoded images
(build_efficiency), warm single-image query latency p50/p95, and for Imagenette
`eval-retrieval` metrics and the time of an incremental update after adding 10 images.
Peak resident memory of a separate `instret query` process (query_rss_mb). The last line on
stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from instret.encoder import embed_images, load_encoder
from instret.images import iter_decoded, list_image_files
from instret.indexer import build_index
from instret.searcher import Searcher, eval_retrieval

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def say(msg: str) -> None:
    print(msg, flush=True)


def forward_images_per_s(model_path, paths, workers: int) -> float:
    """Encoder forward alone, on images decoded beforehand (the ceiling for an index build)."""
    enc = load_encoder(model_path)
    images = decoded(enc, paths, workers)
    encoder_images_per_s(enc, images[:512])  # warm-up
    return encoder_images_per_s(enc, images)


def decoded(encoder, paths, workers: int = 2) -> torch.Tensor:
    """The readable files among paths as the encoder's uint8 input, in memory."""
    return torch.cat([imgs for _, imgs, _, _ in iter_decoded(paths, encoder.image_size, workers) if imgs is not None])


def encoder_images_per_s(encoder, images: torch.Tensor) -> float:
    start = time.perf_counter()
    embed_images(encoder.model, images, encoder.mean, encoder.std, batch_size=256)
    return len(images) / (time.perf_counter() - start)


def latency_ms(index_dir, paths, n: int, seed: int = 0) -> tuple[float, float]:
    searcher = Searcher(index_dir)
    rng = np.random.default_rng(seed)
    sample = [paths[i] for i in rng.choice(len(paths), min(n, len(paths)), replace=False)]
    searcher.query([sample[0]], k=10)  # warm: model, index and metadata loaded
    times = []
    for p in sample:
        start = time.perf_counter()
        searcher.query([p], k=10)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of this
# (large) benchmark process would report the parent's size (1,031 MB against 581 measured alone).
RSS_PROBE = """
import sys
from instret.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
with open("/proc/self/status") as f:
    print(next(line.split()[1] for line in f if line.startswith("VmHWM:")), file=sys.stderr)
"""


def query_rss_mb(index_dir, image) -> float:
    """Peak resident memory of a fresh process running `instret query IMAGE --index DIR`."""
    proc = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, "query", str(image), "--index", str(index_dir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stderr.strip().splitlines()[-1]) / 1024  # VmHWM is in KiB


def bench_collection(name, folder, model, workers, queries, tmp) -> dict:
    paths = list_image_files(folder)
    say(f"[{name}] {len(paths)} images in {folder}")
    fwd = forward_images_per_s(model, paths, workers)
    say(f"[{name}] encoder forward alone: {fwd:.0f} images/s")
    index_dir = Path(tmp) / f"{name}-index"
    start = time.perf_counter()
    summary = build_index(folder, model, index_dir, workers=workers, device="cpu")
    seconds = time.perf_counter() - start
    build_ips = summary["vectors"] / seconds
    say(f"[{name}] index build: {seconds:.1f} s, {build_ips:.0f} images/s (efficiency {build_ips / fwd:.2f})")
    p50, p95 = latency_ms(index_dir, paths, queries)
    say(f"[{name}] warm single-image query: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    return {
        "images": len(paths),
        "build_seconds": round(seconds, 2),
        "build_images_per_s": round(build_ips, 1),
        "forward_images_per_s": round(fwd, 1),
        "build_efficiency": round(build_ips / fwd, 3),
        "query_p50_ms": round(p50, 2),
        "query_p95_ms": round(p95, 2),
        "index_dir": index_dir,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="encoder.pt or a run folder")
    ap.add_argument("--cifar", default=str(SHARED / "cifar10"))
    ap.add_argument("--imagenette", default=str(SHARED / "imagenette2" / "val"))
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    for folder in (args.cifar, args.imagenette):
        if not Path(folder).is_dir():
            sys.exit(f"search benchmark: data folder {folder} not found (pass --cifar / --imagenette)")
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"model": str(args.model), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        cifar = bench_collection("cifar10", args.cifar, args.model, args.workers, args.queries, tmp)
        nette = bench_collection("imagenette", args.imagenette, args.model, args.workers, args.queries, tmp)
        rss = query_rss_mb(cifar["index_dir"], list_image_files(args.cifar)[0])
        say(f"peak resident memory of an `instret query` process (60k index): {rss:.0f} MB")
        metrics = eval_retrieval(args.imagenette, index_dir=nette["index_dir"])
        say(f"[imagenette] eval-retrieval: {metrics}")
        # incremental: a copy of the photos, indexed, then 10 images added
        copy = Path(tmp) / "photos"
        shutil.copytree(args.imagenette, copy)
        build_index(copy, args.model, Path(tmp) / "inc", workers=args.workers, device="cpu")
        for i, p in enumerate(list_image_files(args.cifar)[:10]):
            shutil.copy(p, copy / f"added_{i}.jpg")
        start = time.perf_counter()
        summary = build_index(copy, args.model, Path(tmp) / "inc", workers=args.workers, device="cpu")
        inc = time.perf_counter() - start
        say(f"[imagenette] incremental update after adding 10 images: {inc:.2f} s ({summary['encoded']} encoded)")
    for name, r in (("cifar10", cifar), ("imagenette", nette)):
        r.pop("index_dir")
        result[name] = r
    result.update(
        {
            "build_efficiency": cifar["build_efficiency"],
            "query_p50_ms": cifar["query_p50_ms"],
            "query_p95_ms": cifar["query_p95_ms"],
            "query_rss_mb": round(rss, 1),
            "imagenette_retrieval": metrics,
            "incremental_10_seconds": round(inc, 3),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
