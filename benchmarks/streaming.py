"""Resident against streamed training data: images/s and peak memory, same folder, same run.

    python benchmarks/streaming.py [--data FOLDER] [--image-size 32] [--workers 2] [--epochs 1]

Each mode trains in its own fresh process (so peak memory is its own): `resident` decodes the
folder once into a uint8 tensor and indexes it; `stream` checks every file once, keeps only
the paths, and decodes each batch again in `--workers` processes. Prints one JSON row per mode
(seconds to load, the training process's resident memory once loaded and at its peak, the
peak of its largest decoding worker, images/s of the last epoch) and the ratios stream / resident. On 2 cores the decoding
workers share the cores with training, so streaming costs speed there; it pays where the
decoded set does not fit in memory at all.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def measure(args) -> dict:
    """One mode in this process: load, train args.epochs epochs, report."""
    import torch

    from instret.config import TrainConfig
    from instret.data import load_train_data
    from instret.trainer import Trainer

    torch.set_num_threads(2)
    cfg = TrainConfig(
        data=args.data,
        image_size=args.image_size,
        arch="small",
        epochs=args.epochs,
        workers=args.workers,
        stream=args.mode == "stream",
        out="unused",
    )
    start = time.perf_counter()
    data = load_train_data(cfg)
    trainer = Trainer(cfg, data, torch.device("cpu"))
    loaded = time.perf_counter() - start
    rss_loaded = current_rss_mb()
    for _ in range(args.epochs):
        row = trainer.train_epoch()
    kib = 1024
    return {
        "mode": args.mode,
        "images": len(data.train),
        "image_size": args.image_size,
        "load_seconds": round(loaded, 1),
        "rss_after_load_mb": rss_loaded,
        "images_per_s": row["images_per_s"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 2**20),
        "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 2**20),
    }


def current_rss_mb() -> int:
    """This process's resident memory now (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024)
    return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "cifar10" / "test"))
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--mode", choices=("resident", "stream"), help=argparse.SUPPRESS)  # one child's mode
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    if not Path(args.data).is_dir():
        sys.exit(f"streaming.py: {args.data} is not a folder (pass --data)")
    rows = {}
    for mode in ("resident", "stream"):
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--data",
            args.data,
            "--image-size",
            str(args.image_size),
            "--workers",
            str(args.workers),
            "--epochs",
            str(args.epochs),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(rows[mode]), flush=True)
    r, s = rows["resident"], rows["stream"]
    print(
        json.dumps(
            {
                "decoded_set_mb": round(r["images"] * 3 * args.image_size**2 / 2**20),
                "stream_over_resident_images_per_s": round(s["images_per_s"] / r["images_per_s"], 2),
                "resident_minus_stream_rss_after_load_mb": r["rss_after_load_mb"] - s["rss_after_load_mb"],
                "stream_over_resident_peak_rss": round(s["peak_rss_mb"] / r["peak_rss_mb"], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
