"""What a score means in one index: the scores of unrelated pairs and of edited copies.

A cosine of 0.8 can be a near-certain copy in one collection and an everyday coincidence in
another. When an index is built it measures, in its own search space (post-processing
included), two distributions and stores their quantiles in the manifest:
* unrelated: random pairs of different indexed images (almost all pairs in a collection are
  unrelated);
* copies: an indexed image against an edited copy of itself (instret.edits: crops, JPEG,
  colour shifts, overlays, ...), for a sample of the collection.
A hit's score is then shown beside `unrelated_above` (the share of unrelated pairs that score at
least as high: small means unusual) and `copies_below` (the share of edited copies that score
lower: near 0 means lower than almost any copy).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from instret.edits import EDITS, edited_copy
from instret.encoder import LoadedEncoder, embed_images
from instret.images import ImageReadError, open_rgb, square_tensor

PAIRS = 20_000  # random unrelated pairs measured
COPY_SAMPLE = 200  # indexed images edited and embedded again
LEVELS = np.linspace(0.0, 1.0, 201)  # the stored quantiles: every half per cent


def unrelated_scores(searched: np.ndarray, pairs: int = PAIRS, seed: int = 0) -> np.ndarray:
    """Scores of random pairs i != j of the rows of `searched` (n x D, n >= 2)."""
    n = len(searched)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = rng.integers(0, n - 1, pairs)
    j = j + (j >= i)  # uniform over the other rows
    return np.einsum("pd,pd->p", searched[i], searched[j])


def copy_scores(encoder: LoadedEncoder, paths: list[Path], searched: np.ndarray, transform, seed: int = 0,
                max_pixels: int | None = None) -> np.ndarray:  # fmt: skip
    """Scores of an edited copy of each file against its own searched row (rows in `paths` order);
    files that cannot be read now are left out."""
    rng = random.Random(seed)
    names = sorted(EDITS)
    images, rows = [], []
    for r, path in enumerate(paths):
        try:
            img = open_rgb(path, max_pixels=max_pixels)
        except (ImageReadError, OSError):
            continue
        images.append(square_tensor(edited_copy(img, names[r % len(names)], rng), encoder.image_size))
        rows.append(r)
    if not images:
        return np.empty(0, dtype=np.float32)
    device = next(encoder.model.parameters()).device
    copies = embed_images(encoder.model, torch.stack(images).to(device), encoder.mean, encoder.std)
    return np.einsum("pd,pd->p", transform(copies.cpu().numpy()), searched[rows])


def score_distributions(encoder: LoadedEncoder, searched: np.ndarray, paths: list[Path], transform,
                        max_pixels: int | None = None, seed: int = 0, known: dict | None = None) -> dict | None:  # fmt: skip
    """The manifest entry: quantiles of unrelated-pair and edited-copy scores (None below 2 images).

    searched: the index's vectors as searched (n x D); paths: the file of each row. known: a
    previous entry whose edited-copy quantiles still hold (same encoder and search space, few
    files changed): they are kept rather than measured again, the costly half (200 files
    decoded in full, edited and encoded); the unrelated pairs are always measured anew."""
    if len(searched) < 2:
        return None
    unrelated = unrelated_scores(searched, seed=seed)
    entry = {"levels": len(LEVELS), "unrelated": _quantiles(unrelated), "unrelated_pairs": len(unrelated)}
    if known is not None and "copies" in known:
        return {**entry, "copies": known["copies"], "copies_measured": known["copies_measured"]}
    pick = np.random.default_rng(seed).choice(len(paths), min(COPY_SAMPLE, len(paths)), replace=False)
    copies = copy_scores(encoder, [paths[i] for i in pick], searched[pick], transform, seed, max_pixels)
    if len(copies):
        entry.update({"copies": _quantiles(copies), "copies_measured": len(copies)})
    return entry


def _quantiles(scores: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in np.quantile(scores, LEVELS)]


def describe(score: float, distributions: dict | None) -> dict:
    """{"unrelated_above", "copies_below"} for one score (empty without distributions)."""
    if not distributions:
        return {}
    out = {"unrelated_above": round(_share_at_or_above(score, distributions["unrelated"],
                                                       distributions["unrelated_pairs"]), 6)}  # fmt: skip
    if "copies" in distributions:
        out["copies_below"] = round(1.0 - _share_at_or_above(score, distributions["copies"], 0), 6)
    return out


def _share_at_or_above(score: float, quantiles: list[float], measured: int) -> float:
    """The share of the measured scores at or above `score`, read off their quantiles; beyond the
    highest it is below 1 / measured, reported as half of that (0 when measured is 0)."""
    q = np.asarray(quantiles)
    if score > q[-1]:
        return 0.5 / measured if measured else 0.0
    below = np.interp(score, q, LEVELS[: len(q)]) if score >= q[0] else 0.0
    return float(1.0 - below)
