"""Training images/s with 1 process against `--nproc-per-node 2`, same data, same global batch.

    python benchmarks/distributed_throughput.py [--images 3000] [--epochs 2] [--batch-size 128]

Trains `instret train` on synthetic 32 px images (made here, no download) once with one
process and once with two (gloo on CPU, NCCL on GPUs) and prints the images/s of the last
epoch of each and their ratio. On a 2-core machine the two processes share the same two cores
(one thread each instead of two threads in one process), so expect a ratio near or below 1;
the point there is that it works and what it costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(root: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"c{i % 10}" / f"{i:05d}.png")
    return root


def run(folder: Path, out: Path, nproc: int, args) -> float:
    cmd = [
        sys.executable,
        *"-m instret train --data".split(),
        str(folder),
        "--out",
        str(out),
        *"--arch small --epochs".split(),
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        *"--knn-k 20 --workers 0 --nproc-per-node".split(),
        str(nproc),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_images(Path(tmp) / "img", args.images)
        one = run(folder, Path(tmp) / "one", 1, args)
        two = run(folder, Path(tmp) / "two", 2, args)
    print(
        json.dumps(
            {
                "images": args.images,
                "global_batch": args.batch_size,
                "one_process_images_per_s": one,
                "two_processes_images_per_s": two,
                "ratio": round(two / one, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
