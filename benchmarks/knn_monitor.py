"""kNN monitor benchmark: instret's FAISS-mirrored weighted kNN against the authors' procedure.

    python benchmarks/knn_monitor.py [--bank 50000] [--queries 10000] [--k 200]

Same vectors for both: a 50,000 x 128 bank and 10,000 queries in 10 clusters. The authors'
procedure (docs/method.md; lemniscate.pytorch's test.py, step for step) is a dense product of each
batch of 100 queries with the whole bank, topk and a one-hot weighted vote
(benchmarks/reference_instdisc.py). Predictions must agree (ties aside). Also
reports the search's cost as a share of one CIFAR-10 training epoch, timed here with the
default CPU backbone on random images (`monitor_share`); the whole monitor (embedding the
test images too) is `knn_seconds` in a run's metrics.jsonl. Last stdout line: one JSON object.
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
from reference_instdisc import dense_knn_predict
from timing import seconds_per_step

from instret.knn import FeatureIndex, knn_class_scores


def clustered(n, d, classes, g):
    centres = torch.randn(classes, d, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return F.normalize(centres[labels] + 2.0 * torch.randn(n, d, generator=g), dim=1), labels


def instret_predict(bank, labels, queries, k, sigma, num_classes):
    """(predictions, the search engine that served them)."""
    index = FeatureIndex()
    index.sync(bank)  # the per-epoch mirror of the bank is part of the cost
    scores = knn_class_scores(index, labels, queries, num_classes, k, sigma)
    return torch.cat([s.argmax(dim=1) for _, s in scores]), index.engine


def epoch_seconds(images: int = 50000, batch: int = 128, steps: int = 20) -> float:
    """One CIFAR-10 epoch of the default CPU configuration (50,000-row bank), from timed steps."""
    from instret.config import TrainConfig
    from instret.data import ImageSet, TrainData
    from instret.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    data = TrainData(
        ImageSet(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)), None, "random"
    )
    cfg = TrainConfig.from_dict({"arch": "small", "epochs": 1, "out": "/tmp/unused", "batch_size": batch})
    trainer = Trainer(cfg, data, torch.device("cpu"))
    perm = torch.randperm(images, generator=g)
    return seconds_per_step(lambda i: trainer.step(perm[i * batch : (i + 1) * batch]), steps, warmup=3) / batch * images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=int, default=50000)
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the bank and queries lie (cuda: the GPU search)")
    ap.add_argument("--epoch-steps", type=int, default=20, help="steps timed for the epoch share; 0 skips it")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    bank, labels = clustered(args.bank, args.dim, 10, g)
    queries, _ = clustered(args.queries, args.dim, 10, g)
    bank, labels, queries = bank.to(args.device), labels.to(args.device), queries.to(args.device)
    sigma = 0.1
    times = {"instret": [], "authors": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        t = time.perf_counter()
        ours, engine = instret_predict(bank, labels, queries, args.k, sigma, 10)
        if bank.is_cuda:
            torch.cuda.synchronize()
        times["instret"].append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs = dense_knn_predict(queries, bank, labels, 10, k=args.k, sigma=sigma)
        if bank.is_cuda:
            torch.cuda.synchronize()
        times["authors"].append(time.perf_counter() - t)
    agree = float((ours == theirs.to(ours.device)).float().mean())
    instret_s, authors_s = min(times["instret"]), min(times["authors"])
    print(
        f"instret (FAISS mirror + vote): {instret_s:.3f} s   authors (dense product + topk): {authors_s:.3f} s",
        flush=True,
    )
    print(f"speedup {authors_s / instret_s:.2f}x; predictions agree on {agree:.4%} of queries", flush=True)
    assert agree > 0.999, "predictions differ beyond ties"
    epoch = epoch_seconds(steps=args.epoch_steps) if args.epoch_steps > 0 else None
    if epoch is not None:
        print(
            f"one CIFAR-10 epoch of the default CPU configuration: {epoch:.1f} s; monitor share {instret_s / epoch:.4f}",
            flush=True,
        )
    print(
        json.dumps(
            {
                "instret_s": round(instret_s, 4),
                "authors_s": round(authors_s, 4),
                "speedup": round(authors_s / instret_s, 3),
                "agreement": agree,
                "epoch_s": round(epoch, 2) if epoch else None,
                "monitor_share": round(instret_s / epoch, 4) if epoch else None,
                "device": str(bank.device),
                "engine": engine,
                "bank": args.bank,
                "queries": args.queries,
                "k": args.k,
            }
        )
    )


if __name__ == "__main__":
    main()
