"""Building and updating a search index from a folder of images.

    folder -> scan (path, size, mtime) -> compare with the live generation -> encode what is
    new or changed (staged batch by batch) -> new generation with stable ids -> CURRENT

Unchanged files keep their id and vector; a file whose size or mtime changed but whose
content hash did not is unchanged too. Every encoded batch is committed to staging.sqlite
first, so an interrupted run resumes without encoding it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from instret.calibration import score_distributions
from instret.data import report_skipped
from instret.defaults import INDEX_BATCH, INDEX_DEVICE, INDEX_TYPE, INDEX_WORKERS
from instret.device import resolve_device
from instret.encoder import LoadedEncoder, load_encoder
from instret.env import usable_cpus
from instret.errors import InstretError
from instret.faiss_boundary import as_float32, check_factory
from instret.images import file_sha256, iter_decoded, list_image_files
from instret.index import SearchIndex, make_manifest, write_generation, writer_lock
from instret.locations import encoder_file, image_folder, index_output, read_current
from instret.metadata import Staging
from instret.postprocess import WHITEN_BY_DEFAULT, fit_for_index
from instret.progress import Progress, log

REUSE_SCORES_SHARE = 0.1  # an update changing at most this share of files keeps the copy scores


@dataclass
class FileState:
    rel: str  # path relative to the indexed folder, posix form
    size: int
    mtime_ns: int


def scan(root: Path, shard: tuple[int, int] | None = None) -> tuple[list[FileState], list[tuple[str, str]]]:
    """The image files under root (shard (i, n): every n-th of the sorted listing, from the i-th)."""
    files, skipped = [], []
    paths = list_image_files(root)
    if shard is not None:
        paths = paths[shard[0] :: shard[1]]
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            st = path.stat()
        except OSError as e:
            skipped.append((rel, e.strerror or type(e).__name__))
            continue
        files.append(FileState(rel, st.st_size, st.st_mtime_ns))
    return files, skipped


def encode_files(
    encoder: LoadedEncoder,
    root: Path,
    files: list[FileState],
    staging: Staging,
    batch_size: int,
    workers: int,
    device: torch.device,
    max_pixels: int | None,
):
    """Encode files (in worker-decoded batches), staging each batch; returns ({rel: (sha, vec)}, skipped).

    On the CPU the decoding workers and the encoder share the cores: the encoder takes those the
    workers leave (at least one). Both at full width oversubscribe the machine, and torch's
    threads then wait on each other (Imagenette val, 2 cores: 1,134 images/s with 2 workers
    and 2 encoder threads, 1,436 with 1 encoder thread and batches of 64)."""
    done, skipped = {}, []
    paths = [root / f.rel for f in files]
    progress = Progress(len(files), "encoding")
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 0:
        torch.set_num_threads(max(1, min(threads, usable_cpus() - workers)))
    try:
        for positions, images, digests, bad in iter_decoded(
            paths, encoder.image_size, workers, batch_size, max_pixels, hashes=True
        ):
            skipped += [(files[i].rel, reason) for i, reason in bad]
            if images is not None:
                vectors = as_float32(encoder.embed_inputs(images))
                stage_batch(staging, done, [(files[i], h, v) for i, h, v in zip(positions, digests, vectors)])
            progress.update(len(positions) + len(bad), "")
    finally:
        torch.set_num_threads(threads)
    progress.close()
    return done, skipped


def stage_batch(staging: Staging, done: dict, rows: list[tuple[FileState, str, np.ndarray]]) -> None:
    """Commit one encoded batch of (file, sha256, vector) to staging, and add it to done."""
    staging.add([(f.rel, f.size, f.mtime_ns, h, v) for f, h, v in rows])
    done.update({f.rel: (h, v) for f, h, v in rows})


def build_index(
    images_dir: str | Path,
    model: str | Path,
    out: str | Path,
    factory: str | None = None,
    batch_size: int = INDEX_BATCH,
    workers: int = INDEX_WORKERS,
    device: str = INDEX_DEVICE,
    rebuild: bool | None = False,
    max_pixels: int | None = None,
    shard: tuple[int, int] | None = None,
    whiten: bool | None = None,
    ray: str | None = None,
) -> dict:
    """Create or incrementally update the index of a folder; returns a summary of what was done.

    rebuild: re-encode everything; None: only when the index was built with another encoder
    (False refuses that).

    whiten: fit whitening on the collection and search through it (instret.postprocess); None
    keeps the previous build's choice (a new index: postprocess.WHITEN_BY_DEFAULT, off).

    shard (i, n): index only every n-th file of the sorted listing, from the i-th (one part of a
    large collection, built on its own machine; `merge_shards` joins the parts).

    ray: encode on Ray (instret.ray_encoding): "local" starts one on this machine, else the
    address of a running cluster; everything else stays here."""
    root, out = image_folder(images_dir), index_output(out)
    if ray is not None:
        from instret.ray_encoding import check_address

        check_address(ray)  # before anything is read or written: a wrong address is refused at once
    torch_device = resolve_device(device)
    encoder = load_encoder(model, torch_device)
    start = time.perf_counter()
    with writer_lock(out):
        previous = SearchIndex(out) if read_current(out) and rebuild is not True else None
        if previous is not None and previous.manifest["encoder_fingerprint"] != encoder.fingerprint and rebuild is None:
            previous.close()
            previous = None  # rebuild=None: a new encoder re-encodes everything
        if previous is not None and previous.manifest["encoder_fingerprint"] != encoder.fingerprint:
            raise InstretError(
                f"{out} was built with encoder {previous.manifest['encoder_fingerprint']}, not {encoder.fingerprint} "
                f"({model}); add --rebuild to re-encode everything with the new encoder, or choose another --out"
            )
        if previous is not None and previous.manifest.get("shard") != (list(shard) if shard else None):
            raise InstretError(
                f"{out} holds shard {previous.manifest.get('shard')} of a collection, not "
                f"{list(shard) if shard else 'the whole folder'}; choose another --out"
            )
        factory = factory or (previous.manifest["factory"] if previous else INDEX_TYPE)
        files, skipped = scan(root, shard)
        if not files:
            raise InstretError(f"{root}: no image files found")
        if previous is None or factory != previous.manifest["factory"]:  # a factory built before is known good
            check_factory(factory, encoder.dim, len(files))
        # rel -> (id, size, mtime_ns, sha256, vector)
        old = {rel: (i, *rest) for i, rel, *rest in previous.entries()} if previous is not None else {}
        if previous is not None:
            previous.close()  # read: only its manifest (in memory) is used from here on
        kept, todo = {}, []
        for f in files:
            prev = old.get(f.rel)
            if prev is not None and (prev[1], prev[2]) == (f.size, f.mtime_ns):
                kept[f.rel] = (prev[3], prev[4])
            elif prev is not None and _same_content(root / f.rel, prev[3]):
                kept[f.rel] = (prev[3], prev[4])
            else:
                todo.append(f)
        staging = Staging(out / "staging.sqlite", encoder.fingerprint)
        resumed = {}
        for f in todo:
            hit = staging.lookup(f.rel, f.size, f.mtime_ns)
            if hit is not None:
                resumed[f.rel] = hit
        to_encode = [f for f in todo if f.rel not in resumed]
        log(
            f"indexing {root}: {len(files)} files; {len(kept)} unchanged, {len(resumed)} staged earlier, "
            f"{len(to_encode)} to encode"
        )
        encode_start = time.perf_counter()
        if ray is None:
            encoded, bad = encode_files(
                encoder, root, to_encode, staging, batch_size, workers, torch_device, max_pixels
            )
        else:
            from instret.ray_encoding import encode_files_on_ray

            encoded, bad = encode_files_on_ray(
                encoder, encoder_file(model), root, to_encode, staging, batch_size, max_pixels, ray
            )
        encode_seconds = time.perf_counter() - encode_start
        skipped += bad
        report_skipped(skipped)
        if whiten is None:
            whiten = (
                previous.postprocess.get("whiten", WHITEN_BY_DEFAULT) if previous is not None else WHITEN_BY_DEFAULT
            )
        new = len(encoded) + len(resumed)
        same = previous is not None and unchanged(
            previous, root, factory, whiten, len(kept), len(old), len(skipped), new
        )
        if same:
            name, count, removed = read_current(out), len(kept), 0
        else:
            have = {**kept, **resumed, **encoded}
            entries = [(f.rel, f.size, f.mtime_ns, *have[f.rel]) for f in files if f.rel in have]
            if not entries:
                raise InstretError(f"{root}: none of the {len(files)} image files could be read")
            rows, vectors, ids = with_stable_ids(entries, {rel: v[0] for rel, v in old.items()})
            count, removed = len(rows), len(set(old) - {r[1] for r in rows})
            # A few files changed (at most a tenth, and one at least unchanged): the edited-copy
            # scores of the last build still describe the collection.
            few = previous is not None and kept and new + removed <= REUSE_SCORES_SHARE * count
            known = previous.manifest.get("scores") if few and not previous.postprocess.get("whitening") else None
            whitening, searched, extra = searched_space(encoder, root, rows, vectors, whiten, max_pixels, known)
            manifest = make_manifest(
                vectors,
                factory,
                encoder.fingerprint,
                encoder.model.arch,
                encoder.image_size,
                root,
                len(skipped),
                shard,
                extra,
            )
            src = encoder_file(model)
            name = write_generation(
                out, next_generation(out), manifest, vectors, ids, rows, skipped, src, whitening, searched
            )
        staging.close()
        (out / "staging.sqlite").unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    summary = {
        "index": str(out),
        "generation": name,
        "vectors": count,
        "encoded": len(encoded),
        "resumed": len(resumed),
        "unchanged": len(kept),
        "removed": removed,
        "skipped": len(skipped),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(encoded) / encode_seconds, 1) if encoded else None,
    }
    if not same:
        log(
            f"index {out}: {count} vectors ({len(encoded)} encoded, {removed} removed, "
            f"{len(skipped)} skipped) in {seconds:.1f} s"
        )
    else:
        log(f"index {out}: nothing changed since {name}; no new generation")
    return summary


def unchanged(previous, root: Path, factory: str, whiten: bool, kept: int, had: int, skipped: int, new: int) -> bool:
    """Whether a build would write what the current generation holds: every file as it was,
    none new or gone, as many unreadable ones, the same index type and post-processing."""
    m = previous.manifest
    return (
        new == 0
        and kept == had
        and skipped == m.get("skipped")
        and factory == m["factory"]
        and whiten == previous.postprocess.get("whiten", WHITEN_BY_DEFAULT)
        and m["root"] == str(root.resolve())
    )


def _same_content(path: Path, sha: str) -> bool:
    try:
        return file_sha256(path) == sha
    except OSError:
        return False


def with_stable_ids(entries: list[tuple], old_ids: dict[str, int]):
    """(rows, vectors, ids) in id order from entries (rel, size, mtime_ns, sha256, vector) in
    listing order: a path indexed before keeps its id, a new one gets the next free id."""
    next_id = max(old_ids.values(), default=-1) + 1
    rows, vecs = [], []
    for rel, size, mtime_ns, sha, vec in entries:
        fid = old_ids.get(rel)
        if fid is None:
            fid, next_id = next_id, next_id + 1
        rows.append((fid, rel, size, mtime_ns, sha))
        vecs.append(vec)
    order = np.argsort([r[0] for r in rows], kind="stable")
    vectors = np.ascontiguousarray(np.stack(vecs)[order], dtype=np.float32)
    rows = [rows[i] for i in order]
    return rows, vectors, np.array([r[0] for r in rows], dtype=np.int64)


def searched_space(
    encoder: LoadedEncoder,
    root: Path,
    rows: list[tuple],
    vectors: np.ndarray,
    whiten: bool,
    max_pixels: int | None = None,
    known_scores: dict | None = None,
):
    """(whitening or None, the vectors as searched, the manifest entries "postprocess" and
    "scores") of an index of `vectors`, the encoder vectors of the files `rows` (id, path, ...)
    under root. known_scores: the previous generation's, when its edited-copy scores still
    hold (calibration.score_distributions); used only when nothing is whitened (a whitening
    is fitted anew on every build, so its space moves)."""
    whitening, post = fit_for_index(vectors, whiten)
    transform = whitening if whitening is not None else as_float32
    searched = transform(vectors)
    known = known_scores if whitening is None else None
    scores = score_distributions(encoder, searched, [root / r[1] for r in rows], transform, max_pixels, known=known)
    return whitening, searched, {"postprocess": post, "scores": scores}


def next_generation(out: Path) -> int:
    numbers = [int(p.name[4:]) for p in out.glob("gen-*") if p.name[4:].isdigit()]
    return max(numbers, default=0) + 1
