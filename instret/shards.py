"""Indexing a collection too large for one machine: each machine indexes one shard
(`instret index DIR --shard I/N`, every N-th file of the sorted listing), then one command
joins the shards into one index (`instret merge-index SHARD... --out INDEX_DIR`).

The merged index equals an index built in one go: the same files, the same vectors, ids in
path order (or, when INDEX_DIR already holds a merged index, the ids it gave each path). With
an IVF layout (`--index-type IVF4096,Flat`, ...) the shards are merged without ever holding
every vector: the lists are filled shard by shard on disk (instret.ondisk); other layouts
are built in memory from all the vectors.
"""

from __future__ import annotations

import time
from pathlib import Path

from instret.encoder import load_encoder
from instret.errors import InstretError
from instret.faiss_boundary import fills_lists_on_disk
from instret.index import SearchIndex, merged_manifest, write_generation, writer_lock
from instret.indexer import next_generation, searched_space, with_stable_ids
from instret.locations import index_output, read_current
from instret.ondisk import merge_on_disk
from instret.postprocess import WHITEN_BY_DEFAULT
from instret.progress import log


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise InstretError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of four shards") from None
    if not 0 <= i < n:
        raise InstretError(f"--shard {text!r}: I must be between 0 and N-1")
    return i, n


def merge_shards(shard_dirs: list[str | Path], out: str | Path, factory: str | None = None) -> dict:
    """Join shard indexes (all built with one encoder from one folder) into one index at out."""
    start = time.perf_counter()
    shards = [SearchIndex(d) for d in shard_dirs]
    first = shards[0].manifest
    for s in shards:
        m = s.manifest
        if m.get("shard") is None:
            raise InstretError(f"{s.dir}: not a shard (built without --shard)")
        for key in ("encoder_fingerprint", "root", "dim"):
            if m[key] != first[key]:
                raise InstretError(
                    f"{s.dir}: {key} {m[key]!r} differs from {shards[0].dir}'s {first[key]!r}; "
                    f"shards must come from one folder and one encoder"
                )
    n = first["shard"][1]
    got = sorted(s.manifest["shard"][0] for s in shards)
    if any(s.manifest["shard"][1] != n for s in shards) or got != list(range(n)):
        raise InstretError(f"shards {got} of {n}: give each of the {n} shards exactly once")
    factory = factory or first["factory"]
    on_disk = fills_lists_on_disk(factory, first["dim"])
    out = index_output(out)
    with writer_lock(out):
        previous = SearchIndex(out) if read_current(out) else None
        if previous is not None and previous.manifest["encoder_fingerprint"] != first["encoder_fingerprint"]:
            previous.close()
            previous = None  # another encoder's index is replaced whole: ids start again
        encoder = load_encoder(shards[0].gen_dir / "encoder.pt")
        whiten = shards[0].postprocess.get("whiten", WHITEN_BY_DEFAULT)
        merge = merge_on_disk if on_disk else _merge_in_memory
        try:
            name, count, skipped = merge(shards, out, factory, previous, whiten, encoder)
        finally:
            if previous is not None:
                previous.close()
    for s in shards:
        s.close()
    seconds = time.perf_counter() - start
    lists = " (inverted lists on disk)" if on_disk else ""
    log(f"merged {len(shards)} shards into {out}{lists}: {count} vectors in {seconds:.1f} s")
    return {
        "index": str(out),
        "generation": name,
        "shards": len(shards),
        "vectors": count,
        "skipped": skipped,
        "seconds": round(seconds, 3),
    }


def _merge_in_memory(shards, out, factory, previous, whiten, encoder) -> tuple[str, int, int]:
    """Every shard's vectors read into memory, then one generation built from them."""
    first = shards[0].manifest
    old_ids = {rel: i for i, rel, *_ in previous.files()} if previous is not None else {}
    entries = sorted((e[1:] for s in shards for e in s.entries()), key=lambda e: e[0])  # the one-machine listing order
    skipped = sorted(p for s in shards for p in s.skipped())
    rows, vectors, ids = with_stable_ids(entries, old_ids)
    whitening, searched, extra = searched_space(encoder, Path(first["root"]), rows, vectors, whiten)
    manifest = merged_manifest(first, vectors, factory, len(skipped), extra)
    name = write_generation(
        out,
        next_generation(out),
        manifest,
        vectors,
        ids,
        rows,
        skipped,
        shards[0].gen_dir / "encoder.pt",
        whitening,
        searched,
    )
    return name, len(rows), len(skipped)
