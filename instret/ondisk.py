"""merge-index for collections whose vectors do not fit in one machine's memory together: an
IVF layout trained once on a sample, its inverted lists filled shard by shard and merged on
disk (FAISS's OnDiskInvertedLists: `lists.ivfdata` beside the generation's `index.faiss`).

Memory holds one shard's lists at a time, one block of its vectors, the layout's training
sample and 32 bytes a file, never the collection: the file listing is streamed from the
shards' meta.sqlite in path order (twice: for the ids, then into the new meta.sqlite), the
vectors go into the generation's vectors.npy through a memory map, a whitening is fitted from
moments summed block by block, and each shard's lists are written to disk before the next.
The index equals an in-memory build of the same layout (faiss_boundary.make_faiss_index): the
same training sample, so the same centroids, and the same vectors in the same lists; only the
order inside a list differs. benchmarks/merge_on_disk.py measures both.
"""

from __future__ import annotations

import heapq
import shutil
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from instret import faiss_boundary, metadata
from instret.calibration import score_distributions
from instret.encoder import LoadedEncoder
from instret.errors import InstretError
from instret.faiss_boundary import as_float32
from instret.index import SearchIndex, merged_manifest, write_generation
from instret.indexer import next_generation
from instret.postprocess import MIN_VECTORS, Moments, whitening_entry

BLOCK = 65_536  # rows read, transformed and added at a time
SCRATCH = ".merging"  # inside the index folder (same file system: its files are moved, not copied)


def merge_on_disk(
    shards: list[SearchIndex],
    out: Path,
    factory: str,
    previous: SearchIndex | None,
    whiten: bool,
    encoder: LoadedEncoder,
) -> tuple[str, int, int]:
    """Write the next generation of the index at out from the shards, its lists on disk;
    returns (generation name, vectors, skipped files). previous: the index out holds now (of
    the same encoder), whose paths keep their ids. The caller holds out's writer lock."""
    first = shards[0].manifest
    root = Path(first["root"])
    rows = _Rows(shards, previous)
    skipped = sorted(p for s in shards for p in s.skipped())
    scratch = out / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        vectors, moments = _copy_vectors(shards, rows, scratch / "vectors.npy", first["dim"])
        whitening = moments.whitening() if whiten and len(rows) >= MIN_VECTORS else None
        transform = whitening if whitening is not None else as_float32
        searched = open_memmap(scratch / "searched.npy", "w+", np.float32, vectors.shape)
        for start in range(0, len(rows), BLOCK):
            searched[start : start + BLOCK] = transform(vectors[start : start + BLOCK])
        trained = faiss_boundary.trained_layout(factory, searched)
        parts = []
        for number in range(len(shards)):
            mine = np.flatnonzero(rows.shard == number)
            parts.append(_fill_part(trained, searched, rows.ids, mine, scratch / f"part-{number}.faiss"))
        faiss_boundary.merge_lists_on_disk(trained, parts, scratch / "index.faiss")
        for part in parts:
            part.unlink()
        scores = score_distributions(encoder, searched, _RowPaths(shards, rows, root), transform)
        del searched
        (scratch / "searched.npy").unlink()
        extra = {"postprocess": whitening_entry(whitening, whiten, len(rows)), "scores": scores, "lists": "on-disk"}
        manifest = merged_manifest(first, vectors, factory, len(skipped), extra)
        vectors.flush()
        del vectors
        name = write_generation(
            out,
            next_generation(out),
            manifest,
            None,
            rows.ids,
            rows.files(shards),  # streamed into meta.sqlite
            skipped,
            shards[0].gen_dir / "encoder.pt",
            whitening,
            prebuilt=scratch,
        )
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1]
        raise InstretError(f"{out}: cannot merge the shards ({reason}); the index is unchanged") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return name, len(rows), len(skipped)


def _listing(shards: list[SearchIndex]):
    """(id in the shard, path, size, mtime_ns, sha256, shard) of every file, streamed from the
    shards' meta.sqlite in the one-machine listing's order (path order)."""
    streams = [_tagged(metadata.files_in_path_order(s.meta), number) for number, s in enumerate(shards)]
    return heapq.merge(*streams, key=lambda r: r[1])


def _tagged(rows, number: int):
    for row in rows:
        yield (*row, number)


class _Rows:
    """The merged index's ids as arrays (32 bytes a file): in listing order, and in id order
    with the shard holding each file and its row in that shard's vectors.npy. A
    path `previous` holds keeps its id, a new one gets the next free id (as
    instret.indexer.with_stable_ids, without a dict of every path)."""

    def __init__(self, shards: list[SearchIndex], previous: SearchIndex | None):
        total = sum(s.ntotal for s in shards)
        ids, shard, shard_id = (np.empty(total, dtype=np.int64) for _ in range(3))
        next_id = int(previous.vectors()[1][-1]) + 1 if previous is not None and previous.ntotal else 0
        k = -1
        for k, (fid, rel, *_, number) in enumerate(_listing(shards)):
            i = metadata.id_of(previous.meta, rel) if previous is not None else None
            if i is None:
                i, next_id = next_id, next_id + 1
            ids[k], shard[k], shard_id[k] = i, number, fid
        if k + 1 != total:
            raise InstretError("a shard's metadata and vectors list different files; rebuild that shard")
        self.listed = ids
        order = np.argsort(ids, kind="stable")
        self.ids, self.shard, shard_id = ids[order], shard[order], shard_id[order]
        self.shard_row = np.empty(total, dtype=np.int64)
        for number, s in enumerate(shards):
            mine = self.shard == number
            self.shard_row[mine] = np.searchsorted(s.vectors()[1], shard_id[mine])  # ids.npy is ascending

    def __len__(self) -> int:
        return len(self.ids)

    def files(self, shards: list[SearchIndex]):
        """(id, path, size, mtime_ns, sha256) of every file, streamed again in listing order with
        the ids given above (the previous index is not asked twice)."""
        for i, (_, rel, size, mtime, sha, _) in zip(map(int, self.listed), _listing(shards)):
            yield i, rel, size, mtime, sha


class _RowPaths:
    """The file of each merged row, looked up when asked (calibration reads a sample of them)."""

    def __init__(self, shards: list[SearchIndex], rows: _Rows, root: Path):
        self.shards, self.rows, self.root = shards, rows, root

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int) -> Path:
        shard = self.shards[self.rows.shard[row]]
        ((_, rel, *_),) = metadata.file_rows(shard.meta, [int(shard.vectors()[1][self.rows.shard_row[row]])])
        return self.root / rel


def _copy_vectors(shards: list[SearchIndex], rows: _Rows, path: Path, dim: int):
    """vectors.npy of the merged index (a memory map, rows in id order) and the moments of its rows."""
    vectors = open_memmap(path, "w+", np.float32, (len(rows), dim))
    moments = Moments(dim)
    for number, shard in enumerate(shards):
        target = np.flatnonzero(rows.shard == number)
        source = rows.shard_row[target]
        shard_vectors = shard.vectors()[0]
        for start in range(0, len(target), BLOCK):
            block = np.asarray(shard_vectors[source[start : start + BLOCK]], dtype=np.float32)
            vectors[target[start : start + BLOCK]] = block
            moments.add(block)
    return vectors, moments


def _fill_part(trained, searched, ids, rows: np.ndarray, path: Path) -> Path:
    """One shard's vectors added to a copy of the trained layout, written to path."""
    import faiss

    part = faiss.clone_index(trained)
    for start in range(0, len(rows), BLOCK):
        block = rows[start : start + BLOCK]
        part.add_with_ids(np.ascontiguousarray(searched[block]), ids[block])
    faiss_boundary.write_index(part, path)
    return path
