"""What a run measures of itself: each epoch, the label-free monitor (instret.monitor) and,
with labels, weighted kNN against the bank; at the end, kNN as the paper measures it. Every
figure comes from a copy of the model with clean BatchNorm statistics, the one exported."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from instret.encoder import calibrated_copy, embed_batches
from instret.imagesource import chunks, evenly_spaced
from instret.knn import FeatureIndex, knn_evaluate
from instret.monitor import label_free_metrics

if TYPE_CHECKING:
    from instret.trainer import Trainer

MONITOR_SAMPLE = 512  # images the label-free monitor views each epoch, at most


def monitor_sample(images: int) -> int:
    """Training images the per-epoch monitor views (BatchNorm re-estimation, the label-free
    figures): an eighth of the set, 128 to MONITOR_SAMPLE. Three forward passes each, against
    about four an image for an epoch: a tenth of an epoch's work. A fixed 512 made the monitor
    two thirds of an epoch on the 1,438 digits."""
    return min(MONITOR_SAMPLE, max(128, images // 8))


def evaluated_model(trainer: Trainer, sample: int = MONITOR_SAMPLE) -> torch.nn.Module:
    """The model as evaluated and exported: BatchNorm statistics of clean training images
    (at most MONITOR_SAMPLE images every epoch keep the monitor cheap; the final export uses more)."""
    sample = evenly_spaced(len(trainer.train_images), sample)
    return calibrated_copy(trainer.model, trainer.train_images.batches(chunks(sample)), trainer.mean, trainer.std)


@torch.no_grad()
def label_free(trainer: Trainer, model: torch.nn.Module, sample: int = MONITOR_SAMPLE) -> dict:
    """The label-free monitor (instret.monitor) on an evenly spaced sample of the training
    images, with views from a generator of its own: the run's random stream is untouched."""
    ids = evenly_spaced(len(trainer.train_images), sample)
    images = next(trainer.train_images.batches([ids]))
    generator = torch.Generator(device=trainer.device).manual_seed(trainer.cfg.seed * 100_003 + trainer.epoch)
    model.eval()
    views = model(trainer.augment(images, generator).contiguous(memory_format=torch.channels_last))
    clean = embed_batches(model, images.split(256), trainer.mean, trainer.std)
    metrics = label_free_metrics(views.float(), clean.float(), ids.to(trainer.device), trainer.bank.features)
    return {**metrics, "ln_n": math.log(len(trainer.train_images))}


def knn(trainer: Trainer, keys: torch.Tensor, model: torch.nn.Module, limit: int = 0) -> dict:
    """Weighted kNN top-1/top-5 against `keys` (the bank, or re-embedded training images),
    for the held-out images, or without a held-out split for the keys themselves (leave one
    out); evenly spaced `limit` of them when limit > 0. "knn_engine" names the search."""
    train = trainer.data.train
    index = FeatureIndex()
    index.sync(keys)
    num_classes = len(train.classes)
    common = dict(num_classes=num_classes, k=trainer.cfg.knn_k, sigma=trainer.cfg.tau)
    if trainer.eval_images is None:
        # At 1.28 M images the whole bank against itself is ~420 TFLOP: a sample of it, too.
        pick = evenly_spaced(len(keys), limit) if 0 < limit < len(keys) else torch.arange(len(keys))
        queries, labels = keys[pick.to(keys.device)], train.labels[pick]
        found = knn_evaluate(index, train.labels, queries, labels, leave_one_out=True, key_rows=pick, **common)
    else:
        labels, pick = trainer.data.eval.labels, torch.arange(len(trainer.eval_images))
        if 0 < limit < len(pick):
            # Embedding the held-out images is most of the monitor's cost: a sample keeps it small.
            pick = torch.linspace(0, len(pick) - 1, limit).long()
            labels = labels[pick]
        queries = embed_batches(model, trainer.eval_images.batches(chunks(pick)), trainer.mean, trainer.std)
        found = knn_evaluate(index, train.labels, queries, labels, **common)
    return {**found, "knn_engine": index.engine}


def final_knn(trainer: Trainer, model: torch.nn.Module | None = None) -> dict:
    """kNN of the final model (evaluated_model with a 4,096-image sample, unless given) as the
    paper measures it: the training images re-embedded with the test transform (docs/method.md);
    {} without labels."""
    if not trainer.data.labelled:
        return {}
    model = evaluated_model(trainer, sample=4096) if model is None else model
    every = chunks(torch.arange(len(trainer.train_images)))
    return knn(trainer, embed_batches(model, trainer.train_images.batches(every), trainer.mean, trainer.std), model)


def monitor(trainer: Trainer) -> torch.nn.Module:
    """Add the monitor's figures to the last epoch's row; returns the evaluated model."""
    row = trainer.history[-1]
    t = time.perf_counter()
    sample = monitor_sample(len(trainer.train_images))
    eval_model = evaluated_model(trainer, sample)
    row.update(rounded(label_free(trainer, eval_model, sample)))
    if trainer.data.labelled:
        knn_start = time.perf_counter()
        row.update(rounded(knn(trainer, trainer.bank.features, eval_model, trainer.cfg.monitor_size)))
        row["knn_seconds"] = round(time.perf_counter() - knn_start, 3)
    row["monitor_seconds"] = round(time.perf_counter() - t, 3)
    return eval_model


def rounded(figures: dict) -> dict:
    """Figures for metrics.jsonl and final.json: floats to 4 places, words (knn_engine) as they are."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def epoch_line(row: dict, epochs: int) -> str:
    """The line `instret train` prints after each epoch."""
    text = f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}"
    if "ln_n" in row:
        text += f" (ln n {row['ln_n']:.2f})"
    text += f"  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s"
    if "instance_recall@1" in row:
        text += (
            f"  instance R@1 {row['instance_recall@1']:.3f}  align {row['alignment']:.3f}"
            f"  unif {row['uniformity']:.2f}  pair cos {row['mean_pair_cosine']:.3f}"
        )
    if "knn_top1" in row:
        text += f"  kNN top-1 {row['knn_top1']:.4f} top-5 {row['knn_top5']:.4f}"
    return text
