"""Fidelity on CIFAR-10: instret's trainer against a reference loop, and accuracy on a time budget.

    python benchmarks/fidelity.py [--data ../shared/datasets/cifar10] [--epochs 2] [--minutes 15]

(a) The reference loop (benchmarks/reference_instdisc.py: plain PyTorch straight from
    docs/method.md, per-sample PIL transforms, the same CNN written out again) and instret's
    trainer, with the same backbone, seed and the authors' hyper-parameters, for the same
    number of epochs: test kNN top-1 of each after re-embedding, and seconds per epoch.
(b) `instret train --data DIR --time-budget MINUTES` with the CPU configuration (docs/cpu-configuration.md: "CPU
    configuration"): the run plans its own epochs; test kNN top-1 after re-embedding
    (`budget_top1`), the epochs it planned and its wall time (set-up, monitor, final
    evaluation and index included). With --with-reference the reference loop then trains for
    the same budget (its epochs from one timed epoch), so noise hits both in one run.
First, the cheapest baseline in the same run: weighted kNN on raw pixels
(`pixels_top1`, `pixels_per_image_top1`).
Skip a part with --epochs 0 or --minutes 0. With the defaults the script runs about 22
minutes (part (a) about 6, part (b) its 15-minute budget); --with-reference adds the budget
again. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_instdisc import SmallCNN, train_reference

from instret.augment import channel_stats
from instret.config import TrainConfig
from instret.data import load_folder
from instret.knn import FeatureIndex, knn_evaluate
from instret.run import train
from instret.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# The CPU configuration for a budget of minutes: the CPU backbone, and the "short" recipe that a
# --data run given a --time-budget gets by default (instret/config.py RECIPES; docs/cpu-configuration.md: "CPU
# configuration"). --set '{"recipe": "paper", "bank_init": "features"}' gives the configuration
# measured before 2026-11-29.
CPU_CONFIG = {"arch": "small"}


def run_instret(data, cfg: dict, out: Path) -> tuple[dict, list[dict]]:
    trainer = Trainer(TrainConfig.from_dict({**cfg, "out": str(out)}), data, torch.device("cpu"))
    while trainer.epoch < trainer.cfg.epochs:
        row = trainer.train_epoch()
        print(
            f"instret epoch {row['epoch']}/{trainer.cfg.epochs} loss {row['loss']:.4f} {row['images_per_s']:.0f} img/s",
            flush=True,
        )
    return trainer.final_eval(), trainer.history


def pixel_baselines(data) -> dict:
    """The cheapest baseline, scored as the trainer's final evaluation scores features (weighted
    kNN with the default k and sigma): raw pixels centred by the training images' mean, and each
    image centred on its own mean (brightness removed: the better of the two on CIFAR-10)."""
    train_x, eval_x = (images.flatten(1).float() for images in (data.train.images, data.eval.images))
    centre = train_x.mean(dim=0)
    ways = {
        "pixels_top1": lambda x: x - centre,
        "pixels_per_image_top1": lambda x: x - x.mean(dim=1, keepdim=True),
    }
    found = {}
    for name, way in ways.items():
        index = FeatureIndex()
        index.sync(F.normalize(way(train_x), dim=1))
        knn = knn_evaluate(
            index,
            data.train.labels,
            F.normalize(way(eval_x), dim=1),
            data.eval.labels,
            len(data.train.classes),
            k=TrainConfig.knn_k,
            sigma=TrainConfig.tau,
        )
        found[name] = round(knn["knn_top1"], 4)
    return found


def reference_in_budget(data, seconds: float, workers: int) -> dict:
    """The reference loop for the same wall-clock budget: one timed epoch, then as many more as fit."""
    mean, std = channel_stats(data.train.images.split(512))
    common = dict(mean=mean, std=std, workers=workers, flip=True, log=lambda *a: None)
    args = (data.train.images, data.train.labels, data.eval.images, data.eval.labels)
    t = time.perf_counter()
    train_reference(SmallCNN(), *args, epochs=1, **common)
    epochs = max(1, int((seconds - (time.perf_counter() - t)) / (time.perf_counter() - t)))
    torch.manual_seed(0)
    _, top1 = train_reference(SmallCNN(), *args, epochs=epochs, **common)
    print(f"reference in the same budget: kNN top-1 {top1:.4f} after {epochs} epochs", flush=True)
    return {"reference_budget_epochs": epochs, "reference_budget_top1": round(top1, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "cifar10"))
    ap.add_argument("--epochs", type=int, default=2, help="epochs of part (a); 0 skips it")
    ap.add_argument("--minutes", type=float, default=15, help="budget of part (b); 0 skips it")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", default="{}", help="JSON of config keys to change in part (b), e.g. '{\"lr\": 0.06}'")
    ap.add_argument("--with-reference", action="store_true", help="part (b) also trains the reference loop")
    args = ap.parse_args()
    cpu_config = {**CPU_CONFIG, **json.loads(args.set)}
    if not Path(args.data).is_dir():
        sys.exit(f"fidelity: {args.data} not found (pass --data, a folder with train/ and test/)")
    t = time.perf_counter()
    data = load_folder(args.data, 32, args.workers)
    print(f"decoded {len(data.train)} + {len(data.eval)} images in {time.perf_counter() - t:.1f} s", flush=True)
    result = pixel_baselines(data)
    print(
        f"raw pixels: kNN top-1 {result['pixels_top1']:.4f}, each image centred {result['pixels_per_image_top1']:.4f} "
        f"(k {TrainConfig.knn_k}, sigma {TrainConfig.tau}: the final evaluation's vote)",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp())
    try:
        if args.epochs > 0:
            mean, std = channel_stats(data.train.images.split(512))
            torch.manual_seed(0)
            t = time.perf_counter()
            rows, ref_top1 = train_reference(
                SmallCNN(),
                data.train.images,
                data.train.labels,
                data.eval.images,
                data.eval.labels,
                epochs=args.epochs,
                mean=mean,
                std=std,
                workers=args.workers,
                flip=True,
            )
            ref_s = sum(r["seconds"] for r in rows) / len(rows)
            print(
                f"reference: kNN top-1 {ref_top1:.4f}, {ref_s:.1f} s/epoch ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
            final, hist = run_instret(
                data, {"arch": "small", "epochs": args.epochs, "workers": args.workers}, tmp / "a"
            )
            ours_s = sum(r["seconds"] for r in hist) / len(hist)
            print(f"instret:   kNN top-1 {final['knn_top1']:.4f}, {ours_s:.1f} s/epoch", flush=True)
            result.update(
                {
                    "epochs": args.epochs,
                    "ref_top1": round(ref_top1, 4),
                    "instret_top1": round(final["knn_top1"], 4),
                    "ref_s_per_epoch": round(ref_s, 2),
                    "instret_s_per_epoch": round(ours_s, 2),
                    "fidelity_met": final["knn_top1"] >= ref_top1 - 0.01,
                }
            )
        if args.minutes > 0:
            t = time.perf_counter()
            final = train(
                {
                    "data": args.data,
                    "out": str(tmp / "b"),
                    "time_budget": args.minutes,
                    "workers": args.workers,
                    **cpu_config,
                }
            )
            wall = time.perf_counter() - t
            print(
                f"budget run: kNN top-1 {final['knn_top1']:.4f} after {final['epochs']} epochs, {wall / 60:.1f} min",
                flush=True,
            )
            result.update(
                {
                    "budget_minutes": args.minutes,
                    "budget_epochs": final["epochs"],
                    "budget_wall_minutes": round(wall / 60, 2),
                    "budget_top1": final["knn_top1"],
                    "budget_config": cpu_config,
                }
            )
            if args.with_reference:
                result.update(reference_in_budget(data, args.minutes * 60, args.workers))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
