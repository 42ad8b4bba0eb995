"""The on-disk search index: generations, their manifest, the reader and the atomic writer
(FAISS layouts: instret.faiss_boundary; the SQLite metadata: instret.metadata).

    INDEX_DIR/
      CURRENT              name of the live generation (replaced atomically: the commit point)
      gen-000007/
        encoder.pt         the encoder the vectors came from (queries use it)
        manifest.json      format version, dim, metric, factory, encoder fingerprint, counts,
                           post-processing, the score distributions (instret.calibration)
        whitening.npz      the whitening fitted on these vectors (instret.postprocess), if any
        index.faiss        inner product on the L2-normalised, post-processed vectors, ids = metadata ids
        lists.ivfdata      its inverted lists, when merge-index filled them on disk (instret.ondisk)
        vectors.npy        float32 n x dim encoder vectors, rows in id order (rebuilds need no re-encoding)
        ids.npy            int64 n, ascending
        meta.sqlite        files(id, path, size, mtime_ns, sha256), skipped(path, reason)
      staging.sqlite       vectors encoded by an unfinished run (resume without re-encoding)
      .lock                held by the one writer

A writer builds a whole new generation folder, then swaps CURRENT; readers open CURRENT's
generation, so they see the old index or the new one, never a mix. The previous generation is
kept so that a reader who read CURRENT just before the swap can still open it. Queries go
through the generation's own post-processing, so vectors and queries are always treated alike;
a generation written before post-processing existed has none and is searched as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from instret import faiss_boundary, metadata

# Search-time breadth of approximate layouts (the sizing table in benchmarks/README.md measures recall at these).
from instret.defaults import NPROBE as DEFAULT_NPROBE
from instret.errors import InstretError
from instret.faiss_boundary import GPU_MAX_K, as_float32, faiss_gpu_count, to_gpus
from instret.locations import index_folder, read_current
from instret.postprocess import Whitening
from instret.storage import atomic_write_text, remove_stale_temps

INDEX_FORMAT_VERSION = 1
METRIC = "inner_product"
WHITENING = "whitening.npz"


# --- reading ---------------------------------------------------------------------------


@dataclass
class Hit:
    id: int
    path: str
    score: float


class SearchIndex:
    """A committed generation opened for queries: FAISS index (memory-mapped) plus metadata."""

    def __init__(
        self,
        index_dir: str | Path,
        generation: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        gpu: bool = False,
    ):
        """gpu: search on the GPUs faiss-gpu sees (a query with --device cuda), where the layout
        allows; otherwise, and always with faiss-cpu, on the CPU."""
        self.dir = index_folder(index_dir)
        self.breadth = (nprobe, ef_search)
        self.gpu = gpu
        self._faiss = None
        self._faiss_gpu = None
        self._vectors = None
        for attempt in range(3):
            name = generation or read_current(self.dir)
            if name is None:
                raise InstretError(
                    f"{self.dir}: not an instret index (no CURRENT file); build one with `instret index`"
                )
            try:
                self._open(name)
                return
            except InstretError:
                # A writer may have committed twice since CURRENT was read (it keeps two
                # generations): read CURRENT again rather than report a healthy index damaged.
                if generation is not None or read_current(self.dir) == name or attempt == 2:
                    raise

    def _open(self, name: str) -> None:
        self.generation = name
        self.gen_dir = self.dir / name
        self.manifest = read_manifest(self.gen_dir)
        self.whitening = Whitening.load(self.gen_dir / WHITENING) if "whitening" in self.postprocess else None
        self.meta = metadata.open_metadata(self.gen_dir / "meta.sqlite", readonly=True)

    @property
    def postprocess(self) -> dict:
        return self.manifest.get("postprocess", {})

    def transform(self, vectors) -> np.ndarray:
        """Encoder vectors -> the vectors this generation searches (its post-processing applied)."""
        x = as_float32(vectors)
        return x if self.whitening is None else self.whitening(x)

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def ntotal(self) -> int:
        return self.manifest["count"]

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(float32 n x dim memory-mapped vectors, int64 ids)."""
        if self._vectors is None:
            try:
                self._vectors = (
                    np.load(self.gen_dir / "vectors.npy", mmap_mode="r"),
                    np.load(self.gen_dir / "ids.npy"),
                )
            except (OSError, ValueError) as e:
                raise InstretError(f"{self.gen_dir}: index vectors unreadable ({e})") from None
        return self._vectors

    def faiss_index(self):
        if self._faiss is None:
            path = self.gen_dir / "index.faiss"
            index = faiss_boundary.read_index(path)
            if index.ntotal != self.ntotal or index.d != self.dim:
                raise InstretError(
                    f"{path}: holds {index.ntotal} x {index.d}, the manifest says "
                    f"{self.ntotal} x {self.dim}; the index is damaged, rebuild it"
                )
            faiss_boundary.set_search_breadth(index, *self.breadth)
            self._faiss = index
        return self._faiss

    def _search_engine(self, k: int):
        """The FAISS index to search with k neighbours: a GPU copy when one was asked for, the
        layout runs on FAISS's GPUs (Flat, IVF...,Flat, its lists in memory) and k and nprobe are
        within their 2,048; the CPU index otherwise."""
        index = self.faiss_index()
        if not self.gpu or k > GPU_MAX_K or (self.breadth[0] or DEFAULT_NPROBE) > GPU_MAX_K:
            return index
        if self._faiss_gpu is None:
            factory = self.manifest["factory"]
            gpus = faiss_gpu_count()
            gpu_layout = factory == "Flat" or (factory.startswith("IVF") and factory.endswith(",Flat"))
            if gpus == 0 or not gpu_layout or self.manifest.get("lists") == "on-disk":
                self._faiss_gpu = index
            else:
                self._faiss_gpu = to_gpus(index)
        return self._faiss_gpu

    def search(self, queries, k: int) -> list[list[Hit]]:
        """Best-first hits for each query's encoder vector (k at most)."""
        q = as_float32(queries)
        if q.shape[1] != self.dim:
            raise InstretError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        q = self.transform(q)
        k = min(k, self.ntotal)
        if k <= 0:
            return [[] for _ in range(len(q))]
        scores, ids = self._search_engine(k).search(q, k)
        paths = self.paths_of({int(i) for i in ids.ravel() if i >= 0})
        return [
            [Hit(int(i), paths[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0]
            for srow, irow in zip(scores, ids)
        ]

    def within(self, queries, radius: float, fallback_k: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every indexed vector scoring above `radius` with each query's encoder vector, as flat
        arrays (query row, id, score), searched on the CPU. Layouts FAISS cannot range-search
        answer through their `fallback_k` nearest neighbours instead."""
        q = self.transform(queries)
        index = self.faiss_index()
        try:
            lims, scores, ids = index.range_search(q, float(radius))
            rows = np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64)))
        except RuntimeError:
            scores, ids = index.search(q, min(fallback_k, self.ntotal))
            rows = np.repeat(np.arange(len(q)), scores.shape[1])
            scores, ids = scores.ravel(), ids.ravel()
            keep = (ids >= 0) & (scores > radius)
            rows, scores, ids = rows[keep], scores[keep], ids[keep]
        return rows, ids.astype(np.int64), scores.astype(np.float32)

    def paths_of(self, ids) -> dict[int, str]:
        root = Path(self.manifest["root"])
        return {i: str(root / p) for i, p, *_ in metadata.file_rows(self.meta, ids)}

    def id_of(self, path: str) -> int | None:
        """The id of an indexed file, by the path results show (under the indexed folder) or its
        path relative to that folder; None when the index does not hold it."""
        root = self.manifest["root"].rstrip("/") + "/"
        relative = path[len(root) :] if path.startswith(root) else path
        return metadata.id_of(self.meta, relative)

    def entries(self) -> list[tuple[int, str, int, int, str, np.ndarray]]:
        """(id, path, size, mtime_ns, sha256, vector) of every indexed file, in id order."""
        vectors, ids = self.vectors()
        row_of = {int(i): r for r, i in enumerate(ids)}
        return [(*f, np.asarray(vectors[row_of[f[0]]])) for f in self.files()]

    def files(self, offset: int = 0, limit: int = -1) -> list[tuple[int, str, int, int, str]]:
        """(id, path under the indexed folder, size, mtime_ns, sha256) in id order: all, or a page."""
        return metadata.files_page(self.meta, offset, limit)

    def skipped(self) -> list[tuple[str, str]]:
        return metadata.skipped_files(self.meta)

    def close(self) -> None:
        self.meta.close()


def make_manifest(
    vectors: np.ndarray,
    factory: str,
    fingerprint: str,
    arch: str,
    image_size: int,
    root: Path,
    skipped: int,
    shard: tuple[int, int] | None = None,
    extra: dict | None = None,
) -> dict:
    """manifest.json of a generation (its reader is read_manifest, below)."""
    manifest = {
        "format_version": INDEX_FORMAT_VERSION,
        "dim": int(vectors.shape[1]),
        "metric": METRIC,
        "factory": factory,
        "encoder_fingerprint": fingerprint,
        "encoder_arch": arch,
        "image_size": image_size,
        "root": str(Path(root).resolve()),
        "count": len(vectors),
        "skipped": skipped,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if shard is not None:
        manifest["shard"] = list(shard)
    manifest.update(extra or {})
    return manifest


def merged_manifest(shard: dict, vectors: np.ndarray, factory: str, skipped: int, extra: dict) -> dict:
    """The manifest of an index joined from shards (instret.shards), one of which has manifest `shard`."""
    return make_manifest(
        vectors,
        factory,
        shard["encoder_fingerprint"],
        shard.get("encoder_arch"),
        shard.get("image_size"),
        Path(shard["root"]),
        skipped,
        extra=extra,
    )


def read_manifest(gen_dir: Path) -> dict:
    path = gen_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InstretError(f"{path}: missing or not valid JSON; the index is damaged, rebuild it") from None
    if manifest.get("format_version", 0) > INDEX_FORMAT_VERSION:
        raise InstretError(
            f"{path}: index format version {manifest['format_version']} is newer than "
            f"this instret reads ({INDEX_FORMAT_VERSION})"
        )
    for key in ("dim", "count", "factory", "encoder_fingerprint", "root"):
        if key not in manifest:
            raise InstretError(f"{path}: manifest lacks {key!r}; the index is damaged, rebuild it")
    return manifest


# --- writing ---------------------------------------------------------------------------


@contextmanager
def writer_lock(index_dir: Path):
    """One writer per index folder; a second one is refused at once with a clear message."""
    index_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(index_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstretError(
                f"{index_dir}: another `instret index` is updating this index; wait for it to finish"
            ) from None
        remove_stale_temps(index_dir)  # the lock is ours: temp files here are a killed writer's
        yield
    finally:
        os.close(fd)


def write_generation(
    index_dir: Path,
    generation: int,
    manifest: dict,
    vectors: np.ndarray,
    ids: np.ndarray,
    files: list[tuple],
    skipped: list[tuple[str, str]],
    encoder_file: Path,
    whitening: Whitening | None = None,
    searched: np.ndarray | None = None,
    prebuilt: Path | None = None,
) -> str:
    """Write a complete generation folder, then make it current (the atomic step).

    whitening: saved with the generation; searched: the vectors as the index searches them
    (whitening(vectors), computed once by the caller); without whitening, the vectors.
    prebuilt: a folder on the same file system whose files (index.faiss, vectors.npy and the
    lists they need; instret.ondisk) are moved in instead of being built from the vectors."""

    name = f"gen-{generation:06d}"
    gen_dir = index_dir / name
    if gen_dir.exists():
        shutil.rmtree(gen_dir)
    gen_dir.mkdir()
    try:
        if whitening is not None:
            whitening.save(gen_dir / WHITENING)
        if prebuilt is None:
            searched = vectors if searched is None else searched
            faiss_boundary.write_index(
                faiss_boundary.make_faiss_index(searched, ids, manifest["factory"]), gen_dir / "index.faiss"
            )
            np.save(gen_dir / "vectors.npy", vectors)
        else:
            for built in prebuilt.iterdir():
                os.replace(built, gen_dir / built.name)
        np.save(gen_dir / "ids.npy", ids)
        con = metadata.open_metadata(gen_dir / "meta.sqlite")
        metadata.write_files(con, files, skipped)
        con.close()
        shutil.copyfile(encoder_file, gen_dir / "encoder.pt")
        atomic_write_text(gen_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        for f in gen_dir.iterdir():
            _fsync(f)
    except BaseException as e:
        # A full disk or an interrupt: CURRENT still names the previous, complete generation.
        shutil.rmtree(gen_dir, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError, sqlite3.Error)) and not isinstance(e, InstretError):
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1]
            raise InstretError(
                f"{gen_dir}: cannot write the new index ({reason}); the previous index is "
                f"unchanged, and rerunning continues without re-encoding"
            ) from None
        raise
    previous = read_current(index_dir)
    atomic_write_text(index_dir / "CURRENT", name + "\n")
    for old in index_dir.glob("gen-*"):  # keep the live and the previous generation
        if old.name not in (name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return name


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
