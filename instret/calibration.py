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

Above the 99th percentile of unrelated pairs, their share is extrapolated: the number of
unrelated neighbours within a distance 1 - s of an image grows as a power of that distance
(its exponent is the local intrinsic dimension), fitted through the 99th and 99.9th
percentiles of a million random pairs (TAIL_PAIRS; rare enough structure, such as bursts of
similar photos, shows there; a handful of true copies among a million pairs does not).
Thresholds chosen from it (instret.duplicates) are only as safe as this fit: the duplicates
benchmark compares the precision it promises with the precision found.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from instret.edits import EDITS, edited_copy
from instret.encoder import LoadedEncoder
from instret.images import ImageReadError, open_rgb, square_tensor

PAIRS = 20_000  # random unrelated pairs measured
COPY_SAMPLE = 200  # indexed images edited and embedded again
LEVELS = np.linspace(0.0, 1.0, 201)  # the stored quantiles: every half per cent
TAIL_PAIRS = 1_000_000  # random pairs drawn for the far tail
TAIL_LEVELS = (0.99, 0.999)  # its stored quantiles, which the power-law tail goes through


def unrelated_scores(searched: np.ndarray, pairs: int = PAIRS, seed: int = 0) -> np.ndarray:
    """Scores of random pairs i != j of the rows of `searched` (n x D, n >= 2)."""
    n = len(searched)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = rng.integers(0, n - 1, pairs)
    j = j + (j >= i)  # uniform over the other rows
    return np.einsum("pd,pd->p", searched[i], searched[j])


def unrelated_distribution(searched: np.ndarray, seed: int = 0) -> dict:
    """The unrelated half of the manifest entry: quantiles of PAIRS random pairs, and the far tail."""
    unrelated = unrelated_scores(searched, seed=seed)
    return {
        "levels": len(LEVELS),
        "unrelated": _quantiles(unrelated),
        "unrelated_pairs": len(unrelated),
        **unrelated_tail(searched, seed=seed),
    }


def unrelated_tail(searched: np.ndarray, seed: int = 0) -> dict:
    """{"tail": the TAIL_LEVELS quantiles of random pairs' scores, "tail_pairs"}: the far end of
    the unrelated scores, where the power law is fitted. TAIL_PAIRS pairs (fewer for a small
    index: twenty draws of each pair it has), drawn in chunks (bounded memory)."""
    n = len(searched)
    pairs = min(TAIL_PAIRS, max(PAIRS, 10 * n * (n - 1)))
    chunks = [
        unrelated_scores(searched, min(100_000, pairs - done), seed + 1 + k)
        for k, done in enumerate(range(0, pairs, 100_000))
    ]
    quantiles = np.quantile(np.concatenate(chunks), TAIL_LEVELS)
    return {"tail": [round(float(v), 6) for v in quantiles], "tail_pairs": pairs}


def copy_scores(
    encoder: LoadedEncoder,
    paths: list[Path],
    searched: np.ndarray,
    transform,
    seed: int = 0,
    max_pixels: int | None = None,
) -> np.ndarray:
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
    copies = encoder.embed_inputs(torch.stack(images))
    return np.einsum("pd,pd->p", transform(copies), searched[rows])


def score_distributions(
    encoder: LoadedEncoder,
    searched: np.ndarray,
    paths: list[Path],
    transform,
    max_pixels: int | None = None,
    seed: int = 0,
    known: dict | None = None,
) -> dict | None:
    """The manifest entry: quantiles of unrelated-pair and edited-copy scores (None below 2 images).

    searched: the index's vectors as searched (n x D); paths: the file of each row. known: a
    previous entry whose edited-copy quantiles still hold (same encoder and search space, few
    files changed): they are kept rather than measured again, the costly half (200 files
    decoded in full, edited and encoded); the unrelated pairs are always measured anew."""
    if len(searched) < 2:
        return None
    entry = unrelated_distribution(searched, seed)
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
    out = {"unrelated_above": float(f"{unrelated_share(score, distributions):.3g}")}
    if "copies" in distributions:
        out["copies_below"] = round(1.0 - float(_share_at_or_above(score, distributions["copies"], 0)), 6)
    return out


def unrelated_share(score, distributions: dict):
    """The share of unrelated pairs of the index scoring at least `score` (a float or an array):
    read off the measured quantiles up to the 99th percentile, a power of 1 - score above it,
    through the stored far tail (99th and 99.9th percentiles of a million pairs), or through
    the 95th and 99th percentiles for an index built before the far tail was stored."""
    q = np.asarray(distributions["unrelated"])
    s = np.asarray(score, dtype=np.float64)
    read = _share_at_or_above(s, q, distributions["unrelated_pairs"])
    levels, at = (
        (TAIL_LEVELS, np.asarray(distributions["tail"]))
        if "tail" in distributions
        else ((0.95, 0.99), np.interp((0.95, 0.99), LEVELS[: len(q)], q))
    )
    gaps = 1.0 - at
    if gaps[0] > gaps[1] > 0:  # else a degenerate distribution: no slope to extrapolate with
        dimension = np.log((1 - levels[0]) / (1 - levels[1])) / np.log(gaps[0] / gaps[1])
        read = np.where(s > at[0], (1 - levels[0]) * (np.clip(1.0 - s, 0.0, None) / gaps[0]) ** dimension, read)
    return float(read) if read.ndim == 0 else read


def score_for_unrelated_share(share: float, distributions: dict) -> float:
    """The lowest score whose unrelated share is at most `share` (bisection: the share falls as
    the score rises)."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if unrelated_share(mid, distributions) <= share else (mid, hi)
    return hi


def _share_at_or_above(score, quantiles, measured: int):
    """The share of the measured scores at or above `score`, read off their quantiles; beyond the
    highest it is below 1 / measured, reported as half of that (0 when measured is 0)."""
    q = np.asarray(quantiles)
    share = 1.0 - np.interp(score, q, LEVELS[: len(q)], left=0.0, right=1.0)
    return np.where(np.asarray(score) > q[-1], 0.5 / measured if measured else 0.0, share)
