"""Post-processing of feature vectors that retrieval systems use, fitted on the indexed collection.

* Whitening: centre on the collection's mean, then PCA-whiten with shrinkage,
      x -> normalise((x - mean) V lambda_s^(-1/2) V^T),  lambda_s = (1 - s) lambda + s mean(lambda),
  V, lambda the eigenvectors and eigenvalues of the collection's covariance. Plain cosine lets
  the few directions every image shares dominate a score; whitening weighs each direction by
  how little the collection varies along it. s = 1 is centring alone, s = 0 full whitening
  (which blows up the noise directions of a small collection).
* Query expansion (alpha-QE, Radenovic et al. 2018): search, then search again with
      q' = normalise(q + sum_{i<=k} s_i^alpha x_i)
  over the top k hits x_i with scores s_i (alpha 0: average QE).
* Database-side augmentation (DBA): every indexed vector replaced by the same weighted sum over
  its own top k neighbours (itself included).

The index stores the fitted whitening with each generation (whitening.npz) and applies it to
the indexed vectors and to every query alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from instret.errors import InstretError

DEFAULT_SHRINKAGE = 0.25
MIN_VECTORS = 256  # fewer vectors than this give a covariance too noisy to whiten with
# Whether a new index whitens (`index --whiten` turns it on). Off: on the retrieval benchmark
# (benchmarks/README.md: "Search quality"), with flat borders trimmed before encoding, whitening lifts the
# untrained network (copy mAP 0.691 -> 0.805) but moves a trained encoder's copy mAP by
# -0.004, -0.004 and +0.002 in three 15-minute runs and costs category mAP 0.005-0.011.
WHITEN_BY_DEFAULT = False


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


@dataclass
class Whitening:
    mean: np.ndarray  # D
    projection: np.ndarray  # D x D: V diag(lambda_s^(-1/2)) V^T
    shrinkage: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """n x D vectors -> whitened, L2-normalised n x D float32."""
        x = np.asarray(x, dtype=np.float64)
        return normalise((x - self.mean) @ self.projection)  # n x D @ D x D

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, mean=self.mean, projection=self.projection, shrinkage=np.float64(self.shrinkage))

    @classmethod
    def load(cls, path: Path) -> Whitening:
        try:
            with np.load(path, allow_pickle=False) as z:
                w = cls(z["mean"], z["projection"], float(z["shrinkage"]))
        except (OSError, ValueError, KeyError) as e:
            raise InstretError(f"{path}: whitening unreadable ({e}); the index is damaged, rebuild it") from None
        d = len(w.mean)
        if w.projection.shape != (d, d) or not np.isfinite(w.projection).all():
            raise InstretError(f"{path}: whitening of the wrong shape or not finite; the index is damaged, rebuild it")
        return w


def fit_whitening(x: np.ndarray, shrinkage: float = DEFAULT_SHRINKAGE) -> Whitening:
    """Whitening fitted on the rows of x (n x D), with the eigenvalues shrunk towards their mean."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    return _whitening(mean, centred.T @ centred / max(1, len(x) - 1), shrinkage)  # D x D covariance


class Moments:
    """The count, sum and sum of outer products of rows added block by block: the whitening of
    a collection whose vectors are never in memory together (instret.ondisk)."""

    def __init__(self, dim: int):
        self.count, self.total, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float64)
        self.count += len(block)
        self.total += block.sum(axis=0)
        self.outer += block.T @ block

    def whitening(self, shrinkage: float = DEFAULT_SHRINKAGE) -> Whitening:
        mean = self.total / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / max(1, self.count - 1)
        return _whitening(mean, cov, shrinkage)


def _whitening(mean: np.ndarray, cov: np.ndarray, shrinkage: float) -> Whitening:
    if not 0.0 <= shrinkage <= 1.0:
        raise InstretError(f"whitening shrinkage must be in [0, 1], not {shrinkage}")
    eigvals, eigvecs = np.linalg.eigh(cov)
    eigvals = np.clip(eigvals, 0.0, None)
    shrunk = (1 - shrinkage) * eigvals + shrinkage * eigvals.mean()
    shrunk = np.maximum(shrunk, 1e-12 * max(eigvals.max(), 1e-12))
    # V diag(lambda_s^-1/2) V^T (ZCA form): the same cosines as the PCA basis, but the output
    # does not depend on the eigensolver's choice of signs and order.
    return Whitening(mean, (eigvecs / np.sqrt(shrunk)) @ eigvecs.T, shrinkage)


def fit_for_index(vectors: np.ndarray, whiten: bool) -> tuple[Whitening | None, dict]:
    """The whitening an index of these vectors uses (None: not asked for, or too few vectors to
    fit one) and its manifest entry (whitening_entry)."""
    whitening = fit_whitening(vectors) if whiten and len(vectors) >= MIN_VECTORS else None
    return whitening, whitening_entry(whitening, whiten, len(vectors))


def whitening_entry(whitening: Whitening | None, whiten: bool, count: int) -> dict:
    """The manifest's "postprocess": what was fitted, and what was asked for (the next build's default)."""
    entry: dict = {"whiten": bool(whiten)}
    if whitening is not None:
        entry["whitening"] = {"shrinkage": whitening.shrinkage, "fitted_on": count}
    return entry


def weighted_expansion(x: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float) -> np.ndarray:
    """normalise(sum_i w_i x_i) over each row's neighbours, w_i = max(s_i, 0)^alpha (alpha-QE / DBA).

    x: n x D, the vectors the neighbour rows index into; neighbours, scores: q x k.
    """
    weights = np.maximum(scores, 0.0) ** alpha  # q x k
    return normalise(np.einsum("qk,qkd->qd", weights, x[neighbours]))  # q x k, q x k x D -> q x D


def expand_queries(
    queries: np.ndarray, database: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, alpha: float = 3.0
) -> np.ndarray:
    """alpha-QE: each query plus its top hits (rows of `database`), weighted by score^alpha."""
    q, k = neighbours.shape
    rows = np.concatenate([np.arange(len(database), len(database) + q)[:, None], neighbours], axis=1)
    both = np.concatenate([database, np.asarray(queries, dtype=np.float32)])
    return weighted_expansion(both, rows, np.concatenate([np.ones((q, 1)), scores], axis=1), alpha)


def expand_database(database: np.ndarray, k: int = 3, alpha: float = 3.0, chunk: int = 1024) -> np.ndarray:
    """DBA: each vector becomes the weighted sum of its top k neighbours, itself included (exact
    search, a block of rows at a time)."""
    k = min(k, len(database))
    out = []
    for start in range(0, len(database), chunk):
        sims = database[start : start + chunk] @ database.T  # c x n
        neighbours = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        out.append(weighted_expansion(database, neighbours, np.take_along_axis(sims, neighbours, axis=1), alpha))
    return np.concatenate(out) if out else normalise(database)
