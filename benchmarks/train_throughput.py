"""Training throughput: instret's input pipeline and step against the authors' style.

    python benchmarks/train_throughput.py [--data ../shared/datasets/cifar10/train] [--steps 30]

Authors' style: CIFAR-10 held as uint8 arrays, each sample turned into a PIL image and put
through the paper's per-sample torchvision transforms in a DataLoader (2 workers), then the
step (exact softmax over a 50,000-row bank, SGD, bank update). instret: the same images
resident as one uint8 tensor, batched tensor augmentation, channels_last, the same step;
with its defaults (bf16 autocast on a CPU with AMX) and in float32 (--no-amp), so the bf16
gain is measured in the same run. Same backbone, batch (128) and loss. Runs alternate so
machine noise hits both; the best of the repeats counts. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_instdisc import IndexedImages, paper_transform
from timing import seconds_per_step

from instret.augment import channel_stats
from instret.config import TrainConfig
from instret.data import ImageSet, TrainData, read_folder
from instret.device import fast_cpu_bf16
from instret.encoder import Encoder
from instret.trainer import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def instret_ips(images, arch, steps, batch, amp: bool | None = None) -> float:
    """amp None: instret's default (bf16 autocast on a CPU with AMX)."""
    data = TrainData(ImageSet(images), None, "cifar10")
    cfg = TrainConfig.from_dict({"arch": arch, "epochs": 1, "out": "/tmp/unused", "batch_size": batch, "amp": amp})
    trainer = Trainer(cfg, data, torch.device("cpu"))
    perm = torch.randperm(len(images))
    return batch / seconds_per_step(lambda i: trainer.step(perm[i * batch : (i + 1) * batch]), steps)


def authors_ips(images, arch, steps, batch, workers) -> float:
    mean, std = channel_stats(images.split(512))
    torch.manual_seed(0)
    model = Encoder(arch, 128, 32)
    bank = F.normalize(torch.randn(len(images), 128), dim=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        IndexedImages(images, paper_transform(32, mean, std)),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )
    it = iter(loader)

    def step(_):
        x, idx = next(it)
        f = model(x)
        loss = F.cross_entropy(f @ bank.T / 0.1, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            bank[idx] = F.normalize(bank[idx] * 0.5 + f.detach() * 0.5, dim=1)

    # warm-up: the workers start and prefetch; drop_last keeps every batch full
    return batch / seconds_per_step(step, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "cifar10" / "train"))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run (small backbone)")
    ap.add_argument("--resnet-steps", type=int, default=4, help="timed steps per run (resnet18)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"train_throughput: {args.data} not found (pass --data DIR of CIFAR-10 training images)")
    t = time.perf_counter()
    images = read_folder(Path(args.data), 32, args.workers).images
    print(f"decoded {len(images)} images in {time.perf_counter() - t:.1f} s", flush=True)
    result = {"batch_size": args.batch_size, "threads": torch.get_num_threads(), "bf16_default": fast_cpu_bf16()}
    for arch, steps in (("small", args.steps), ("resnet18", args.resnet_steps)):
        ours, fp32, theirs = [], [], []
        for _ in range(args.repeats):
            ours.append(instret_ips(images, arch, steps, args.batch_size))
            fp32.append(instret_ips(images, arch, steps, args.batch_size, amp=False))
            theirs.append(authors_ips(images, arch, steps, args.batch_size, args.workers))
            print(
                f"{arch}: instret {ours[-1]:.0f} img/s (float32 {fp32[-1]:.0f}), authors' style {theirs[-1]:.0f} img/s",
                flush=True,
            )
        best_ours, best_fp32, best_theirs = max(ours), max(fp32), max(theirs)
        result[arch] = {
            "instret_ips": round(best_ours, 1),
            "instret_fp32_ips": round(best_fp32, 1),
            "authors_ips": round(best_theirs, 1),
            "speedup": round(best_ours / best_theirs, 3),
            "bf16_speedup": round(best_ours / best_fp32, 3),
        }
        print(
            f"{arch}: speedup {best_ours / best_theirs:.2f}x (bf16 over float32 {best_ours / best_fp32:.2f}x)",
            flush=True,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
