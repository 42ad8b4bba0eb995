"""Queries against an index, and retrieval metrics."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from instret.calibration import describe
from instret.defaults import INDEX_DEVICE, INDEX_WORKERS, QUERY_DEVICE, QUERY_K
from instret.device import resolve_device
from instret.encoder import load_encoder
from instret.errors import InstretError
from instret.faiss_boundary import as_float32
from instret.images import ImageReadError, decode_image, file_sha256
from instret.index import SearchIndex
from instret.locations import image_folder


class Searcher:
    """An open index plus the encoder it was built with: image files in, ranked hits out."""

    def __init__(
        self,
        index_dir: str | Path,
        model: str | Path | None = None,
        device: str = "cpu",
        max_pixels: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        self.device = resolve_device(device)
        self.index = SearchIndex(index_dir, nprobe=nprobe, ef_search=ef_search, gpu=self.device.type == "cuda")
        self.max_pixels = max_pixels
        self.encoder = load_encoder(self.index.gen_dir / "encoder.pt", self.device)
        expected = self.index.manifest["encoder_fingerprint"]
        if self.encoder.fingerprint != expected:
            raise InstretError(
                f"{self.index.gen_dir}/encoder.pt has fingerprint {self.encoder.fingerprint} but the "
                f"index was built with {expected}; the index is damaged, rebuild it"
            )
        if model is not None:
            other = load_encoder(model)
            if other.fingerprint != expected:
                raise InstretError(
                    f"{model} (encoder {other.fingerprint}) is not the encoder {index_dir} was built "
                    f"with ({expected}); query without --model, or rebuild the index with it"
                )
        if self.encoder.dim != self.index.dim:
            raise InstretError(f"encoder dimension {self.encoder.dim} != index dimension {self.index.dim}")

    def query(
        self,
        items=(),
        k: int = QUERY_K,
        min_score: float | None = None,
        exclude_self: bool = False,
        existing_only: bool = False,
        ids=(),
    ) -> list[dict]:
        """One {"query", "results": [{"rank", "id", "path", "score", "missing", ...}]} per query
        image (a file, a PIL image or an image tensor; "query" is the file's path or "<image
        i>"), best first; or, with ids, per image already in the index (its stored vector is
        searched: nothing is read or encoded). "missing": the file is gone since it was indexed
        (existing_only leaves such files out). With the index's score distributions, each result
        also says how unusual its score is (instret.calibration.describe: "unrelated_above",
        "copies_below"). Raises InstretError for an id the index does not hold."""
        if k < 1:
            raise InstretError(f"-k must be at least 1, not {k}")
        if len(ids):
            names, vectors = self._stored(ids)
            without_self = [lambda hits, i=int(i): [h for h in hits if h.id != i] for i in ids]
        else:
            names, vectors = self.encoder.embed_named(items, self.max_pixels)
            # The same file, or the same bytes; an image handed in memory has neither.
            without_self = [None if n.startswith("<image ") else functools.partial(_without_self, n) for n in names]
        found = self._search(vectors, k + (1 if exclude_self else 0), existing_only)
        out = []
        for name, hits, drop in zip(names, found, without_self):
            if exclude_self and drop is not None:
                hits = drop(hits)
            out.append(self._ranked(name, hits, k, min_score))
        return out

    def decode_uploads(self, uploads) -> tuple[list[str], torch.Tensor]:
        """(names, the encoder's uint8 input) of (name, bytes) pairs of image files sent to a
        server, each decoded exactly as `instret index` reads a file. Raises InstretError
        naming the first it cannot read."""
        names, pictures = [], []
        for name, data in uploads:
            try:
                pictures.append(decode_image(data, self.encoder.image_size, self.max_pixels))
            except ImageReadError as e:
                raise InstretError(f"{name}: cannot read image: {e}") from None
            names.append(name)
        if not pictures:
            raise InstretError("no image in the request")
        return names, torch.stack(pictures)

    def query_decoded(
        self,
        names,
        pictures: torch.Tensor,
        k: int = QUERY_K,
        min_score: float | None = None,
        existing_only: bool = False,
    ) -> list[dict]:
        """As query(), for decode_uploads()' output."""
        hits = self._search(self.encoder.embed_inputs(pictures), k, existing_only)
        return [self._ranked(name, found, k, min_score) for name, found in zip(names, hits)]

    def _stored(self, ids) -> tuple[list[str], np.ndarray]:
        """(paths, stored vectors) of indexed images, by id."""
        vectors, stored = self.index.vectors()
        rows = np.searchsorted(stored, ids)  # ids.npy is ascending
        for i, r in zip(ids, rows):
            if r >= len(stored) or stored[r] != i:
                raise InstretError(f"no image with id {i} in this index")
        paths = self.index.paths_of(int(i) for i in ids)
        return [paths[int(i)] for i in ids], np.asarray(vectors[rows])

    def _search(self, vectors, k: int, existing_only: bool) -> list[list]:
        """The index's k best hits of each vector; existing_only: of files still there, the
        search widened (k doubled) while a query has fewer and the index holds more."""
        found = self.index.search(vectors, k)
        if not existing_only:
            return found
        wanted = k
        while True:
            kept = [[h for h in hits if os.path.exists(h.path)] for hits in found]
            if wanted >= self.index.ntotal or all(len(h) >= k for h in kept):
                return [h[:k] for h in kept]
            wanted = min(2 * wanted, self.index.ntotal)
            found = self.index.search(vectors, wanted)

    def _ranked(self, name: str, hits, k: int, min_score: float | None) -> dict:
        scores = self.index.manifest.get("scores")
        hits = [h for h in hits if min_score is None or h.score >= min_score][:k]
        return {
            "query": name,
            "results": [
                {
                    "rank": r,
                    "id": h.id,
                    "path": h.path,
                    "score": round(h.score, 6),
                    "missing": not os.path.exists(h.path),  # a stat: deleted or moved since it was indexed
                    **describe(h.score, scores),
                }
                for r, h in enumerate(hits, 1)
            ],
        }


def _without_self(query: str, hits):
    """Drop the query image itself: the same file, or a file with the same bytes."""
    me = Path(query).resolve()
    digest = None
    kept = []
    for h in hits:
        if Path(h.path).resolve() == me:
            continue
        if h.score > 0.9999:  # only a near-perfect match can be a byte copy: hash just those
            digest = digest or file_sha256(me)
            try:
                if file_sha256(h.path) == digest:
                    continue
            except OSError:
                pass
        kept.append(h)
    return kept


def query(
    index_dir,
    images,
    k=QUERY_K,
    min_score=None,
    exclude_self=False,
    model=None,
    device=QUERY_DEVICE,
    max_pixels=None,
    nprobe=None,
    ef_search=None,
    existing_only=False,
) -> list[dict]:
    searcher = Searcher(index_dir, model, device, max_pixels, nprobe, ef_search)
    return searcher.query(images, k, min_score, exclude_self, existing_only)


# --- retrieval metrics ------------------------------------------------------------------


def retrieval_metrics(vectors: np.ndarray, labels: np.ndarray, ks=(1, 5, 10), chunk: int = 1024) -> dict:
    """Each item queries all the others: mAP, recall@k (a relevant item in the top k), precision@10."""
    x = torch.from_numpy(as_float32(vectors))
    y = torch.from_numpy(np.asarray(labels))
    n = len(x)
    if n < 2:
        raise InstretError("retrieval needs at least 2 images")
    aps, recall, prec10 = [], {k: [] for k in ks}, []
    for start in range(0, n, chunk):
        sims = x[start : start + chunk] @ x.T  # c x n
        rows = torch.arange(start, min(start + chunk, n))
        sims[torch.arange(len(rows)), rows] = -float("inf")  # never retrieve the query itself
        order = sims.argsort(dim=1, descending=True)[:, : n - 1]
        rel = (y[order] == y[rows].view(-1, 1)).float()  # c x (n-1), relevance in rank order
        total = rel.sum(dim=1)
        hits_so_far = rel.cumsum(dim=1)
        ranks = torch.arange(1, n, dtype=torch.float32)
        ap = (rel * hits_so_far / ranks).sum(dim=1) / total.clamp_min(1)
        aps.append(ap[total > 0])
        for k in ks:
            recall[k].append((rel[:, :k].sum(dim=1) > 0).float()[total > 0])
        prec10.append(rel[:, :10].sum(dim=1)[total > 0] / 10)
    result = {"mAP": float(torch.cat(aps).mean())}
    result.update({f"recall@{k}": float(torch.cat(recall[k]).mean()) for k in ks})
    result["precision@10"] = float(torch.cat(prec10).mean())
    result["queries"] = int(sum(len(a) for a in aps))
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}


def eval_retrieval(
    images_dir: str | Path,
    model: str | Path | None = None,
    index_dir: str | Path | None = None,
    workers: int = INDEX_WORKERS,
    device: str = INDEX_DEVICE,
    max_pixels: int | None = None,
) -> dict:
    """Retrieval metrics on a folder of group sub-folders, from an encoder or an existing index."""
    from instret.data import find_classes

    root = image_folder(images_dir)
    classes = find_classes(root)
    if classes is None:
        raise InstretError(f"{root}: needs one sub-folder per group (object, scene or class), at least two")
    if (model is None) == (index_dir is None):
        raise InstretError("give exactly one of --model or --index")
    if index_dir is None:
        import tempfile

        from instret.indexer import build_index

        with tempfile.TemporaryDirectory() as tmp:
            build_index(root, model, tmp, workers=workers, device=device, max_pixels=max_pixels)
            return _metrics_of_index(tmp, root, classes)
    return _metrics_of_index(index_dir, root, classes)


def _metrics_of_index(index_dir, root: Path, classes: list[str]) -> dict:
    index = SearchIndex(index_dir)
    vectors, ids = index.vectors()
    base = Path(index.manifest["root"])
    if base.resolve() != root.resolve():
        raise InstretError(f"{index_dir} indexes {base}, not {root}")
    rel_of = {i: p for i, p, *_ in index.files()}
    label_of = {c: n for n, c in enumerate(classes)}
    keep, labels = [], []
    for r, i in enumerate(ids):
        group = Path(rel_of[int(i)]).parts[0]
        if group in label_of:
            keep.append(r)
            labels.append(label_of[group])
    return retrieval_metrics(index.transform(np.asarray(vectors)[keep]), np.array(labels))
