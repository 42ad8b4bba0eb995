"""The paper's setting on a GPU: ResNet-18 Instance Discrimination on CIFAR-10 within a budget.

    python benchmarks/gpu_cifar10.py [--data ../shared/datasets/cifar10 | --npz cifar10.npz]
                                     [--minutes 5] [--arch resnet18] [--device auto] [--record]

Trains instret's Trainer for as many epochs as fit in `--minutes` (the schedule is sized for
200 epochs, as the authors', so a short run is the start of the real one), then prints
images/s, seconds per epoch, peak GPU memory, test kNN top-1 on the bank and after
re-embedding, and the projected 200-epoch time. `--max-steps N` stops after N steps (a CPU
smoke test uses it). `--npz` reads arrays train_x (N x 32 x 32 x 3 uint8), train_y, test_x,
test_y: what a GPU machine without ../shared gets. `--record` writes the figures to
benchmarks/results/gpu_cifar10-<date>.json. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from a bare checkout too

from instret.config import TrainConfig
from instret.data import ImageSet, TrainData, load_folder
from instret.device import resolve_device
from instret.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CLASSES = [str(i) for i in range(10)]


def load(args) -> TrainData:
    if args.npz:
        z = np.load(args.npz)

        def part(x, y):
            return ImageSet(
                torch.from_numpy(z[x]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(z[y]).long(), CLASSES
            )

        return TrainData(part("train_x", "train_y"), part("test_x", "test_y"), "cifar10")
    if not Path(args.data).is_dir():
        sys.exit(f"gpu_cifar10: {args.data} not found (pass --data DIR with train/ and test/, or --npz FILE)")
    return load_folder(args.data, 32, workers=args.workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "cifar10"))
    ap.add_argument("--npz")
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--out", default="/tmp/instret-gpu-cifar10")
    args = ap.parse_args()
    device = resolve_device(args.device)
    data = load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_dict({"arch": args.arch, "epochs": 200, "out": str(out), "device": str(device)})
    trainer = Trainer(cfg, data, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.arch} on {name}: {len(data.train)} training images", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    budget = args.minutes * 60
    start = time.perf_counter()
    rows, steps = [], 0
    while time.perf_counter() - start < budget and (args.max_steps is None or steps < args.max_steps):
        row = trainer.train_epoch(max_steps=args.max_steps)  # smoke test: a few steps, no whole epoch
        steps += args.max_steps or 0
        trainer.monitor()  # as `instret train` monitors an epoch
        rows.append(row)
        if args.max_steps is not None:
            break
        print(
            f"epoch {row['epoch']}: {row['seconds']:.1f} s, {row['images_per_s']:.0f} img/s, kNN {row['knn_top1']:.4f}",
            flush=True,
        )
    final = trainer.final_eval() if trainer.epoch > 0 else {}
    timed = rows[1:] or rows  # the first epoch pays for warm-up
    sec_per_epoch = (
        sum(r["seconds"] for r in timed)
        / len(timed)
        * (len(data.train) / (cfg.batch_size * steps) if args.max_steps else 1)
    )
    result = {
        "device": name,
        "date": date.today().isoformat(),
        "arch": args.arch,
        "images_per_s": round(sum(r["images_per_s"] for r in timed) / len(timed), 1),
        "seconds_per_epoch": round(sec_per_epoch, 2),
        "epochs": trainer.epoch,
        "knn_top1": round(final.get("knn_top1", rows[-1].get("knn_top1", float("nan"))), 4),
        "bank_knn_top1": rows[-1].get("knn_top1"),
        "projected_200_epoch_minutes": round(sec_per_epoch * 200 / 60, 1),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }
    if args.record:
        path = Path(__file__).resolve().parent / "results" / f"gpu_cifar10-{result['date']}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"recorded {path}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
