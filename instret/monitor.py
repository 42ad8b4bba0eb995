"""The label-free monitor: is training on an unlabelled folder going well?

Every epoch, on an evenly spaced sample of the training images (docs/training.md: "Reading the monitor"):
* instance recall@1: one new augmented view of each finds its own row of the memory bank
  (the task being learned, measured on fresh views; near 0 at the start, rising);
* alignment: mean ||f(view) - f(clean)||^2 between a view and the clean image (Wang & Isola
  2020; 0 is perfect invariance, 4 the most two unit vectors can differ);
* uniformity: log mean exp(-2 ||f_i - f_j||^2) over pairs of clean images (from 0, every
  feature equal, down to about -4 for features spread over the sphere);
* the mean cosine of random pairs of clean images (near 1: collapse, every image alike);
* the loss beside ln n, the loss of a guess (the exact softmax's loss is ln n when the bank
  tells nothing; NCE's scale differs).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def label_free_metrics(
    views: torch.Tensor, clean: torch.Tensor, ids: torch.Tensor, bank: torch.Tensor, chunk: int = 1024
) -> dict[str, float]:
    """views, clean: m x D unit features of an augmented and of the clean view of the images whose
    bank rows are ids (m); bank: n x D."""
    hits = 0
    for start in range(0, len(views), chunk):
        best = (views[start : start + chunk] @ bank.T).argmax(dim=1)  # c x D @ D x n -> c x n -> c
        hits += int((best == ids[start : start + chunk]).sum())
    m = len(clean)
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=clean.device)
    cos = (clean @ clean.T)[off_diagonal]  # m x m without the diagonal
    squared = (2 - 2 * cos).clamp_min(0)  # ||a - b||^2 of unit vectors
    return {
        "instance_recall@1": hits / len(views),
        "alignment": float((views - clean).pow(2).sum(dim=1).mean()),
        "uniformity": float(torch.logsumexp(-2 * squared, dim=0) - math.log(len(squared))) if m > 1 else 0.0,
        "mean_pair_cosine": float(cos.mean()) if m > 1 else 1.0,
    }
