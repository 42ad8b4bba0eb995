"""merge-index with an IVF layout: lists filled shard by shard on disk (instret.ondisk)."""

import functools
import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest

from instret import ondisk
from instret.duplicates import find_duplicates
from instret.encoder import Encoder, save_encoder
from instret.errors import InstretError
from instret.faiss_boundary import LISTS, fills_lists_on_disk
from instret.index import SearchIndex, make_manifest, write_generation, writer_lock
from instret.indexer import build_index
from instret.postprocess import Moments, fit_whitening
from instret.searcher import Searcher
from instret.shards import _merge_in_memory, merge_shards
from tests.conftest import make_photos
from tests.test_cli import run_cli
from tests.test_index import QUIET, vectors_by_path


def exact_neighbours(index_dir, queries, k):
    """(scores, ids) of every query over every list (nprobe = nlist: an IVF search made exact)."""
    index = SearchIndex(index_dir, nprobe=64)
    scores, ids = index.faiss_index().search(index.transform(queries), k)
    index.close()
    return scores, ids


def test_layouts_with_inverted_lists_are_the_ones_filled_on_disk():
    assert [fills_lists_on_disk(f, 128) for f in ("IVF16,Flat", "OPQ16,IVF16,PQ16", "Flat", "HNSW32")] == [
        True,
        True,
        False,
        False,
    ]
    assert not fills_lists_on_disk("IVF16,PQ16+16", 128)  # IVFPQR: FAISS cannot put it on disk
    assert not fills_lists_on_disk("NotAnIndex42", 128)


def test_on_disk_merge_equals_a_one_machine_build_and_survives_a_move(trained_run, tmp_path, capfd):
    photos = make_photos(tmp_path / "photos", per_group=10)
    shutil.copy(photos / "a" / "002.jpg", photos / "c" / "copy_of_a2.jpg")
    whole = tmp_path / "whole"
    build_index(photos, trained_run, whole, factory="IVF4,Flat", **QUIET)
    for i in range(3):
        build_index(photos, trained_run, tmp_path / f"s{i}", shard=(i, 3), **QUIET)
    code, out, err = run_cli(
        [
            "merge-index",
            *(str(tmp_path / f"s{i}") for i in (1, 2, 0)),
            "--out",
            str(tmp_path / "m"),
            "--index-type",
            "IVF4,Flat",
        ],
        capfd,  # FAISS's own prints (C stdout) would land here, before the JSON
    )
    assert code == 0, err
    assert json.loads(out)["vectors"] == 31 and "inverted lists on disk" in err
    merged = SearchIndex(tmp_path / "m")
    assert merged.manifest["lists"] == "on-disk" and (merged.gen_dir / LISTS).exists()
    assert sorted(p.name for p in merged.gen_dir.iterdir()) == sorted(
        ["encoder.pt", "ids.npy", "index.faiss", LISTS, "manifest.json", "meta.sqlite", "vectors.npy"]
    )
    a, b = vectors_by_path(whole), vectors_by_path(tmp_path / "m")
    assert sorted(a) == sorted(b)
    for path, (i, v) in a.items():
        assert b[path][0] == i and np.allclose(b[path][1], v, atol=1e-5), path
    queries = merged.vectors()[0][:12]
    merged.close()
    want, got = exact_neighbours(whole, queries, 5), exact_neighbours(tmp_path / "m", queries, 5)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    tie = got[0][:, 0] - got[0][:, 1] < 1e-6  # a/002.jpg and its byte copy: the order inside a list decides
    assert ((got[1][:, 0] == want[1][:, 0]) | tie).all() and tie.sum() == 1
    # The folder moves (a copy to another disk, a rename): the lists are found beside the index.
    shutil.move(tmp_path / "m", tmp_path / "moved")
    hits = Searcher(tmp_path / "moved").query([photos / "b" / "003.jpg"], k=2)[0]["results"]
    assert hits[0]["path"].endswith("b/003.jpg") and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    groups = [sorted(m["path"] for m in g["members"]) for g in find_duplicates(tmp_path / "moved")["groups"]]
    assert groups == [[str(photos / "a" / "002.jpg"), str(photos / "c" / "copy_of_a2.jpg")]]
    # Damaged lists are one clear error, not a crash when a search reaches the missing part.
    lists = SearchIndex(tmp_path / "moved").gen_dir / LISTS
    whole_lists = lists.read_bytes()
    lists.write_bytes(whole_lists[: len(whole_lists) // 2])
    with pytest.raises(InstretError, match="truncated"):
        Searcher(tmp_path / "moved").query([photos / "b" / "003.jpg"], k=2)
    lists.write_bytes(whole_lists)
    # A later plain update of the merged index rebuilds in memory, keeping every id.
    (photos / "a" / "000.jpg").unlink()
    build_index(photos, trained_run, tmp_path / "moved", **QUIET)
    after = vectors_by_path(tmp_path / "moved")
    assert len(after) == 30 and all(after[p][0] == b[p][0] for p in after)


def synthetic_shards(folder, encoder_file, count, parts, dim=16, whiten=False, seed=0):
    """Shard indexes of `count` random unit vectors (files that do not exist: calibration skips them)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, dim)).astype(np.float32) * np.linspace(3, 0.2, dim, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dirs = []
    for part in range(parts):
        rows = np.arange(part, count, parts)
        files = [(i, f"f{r:07d}.jpg", 1, 1, "") for i, r in enumerate(rows)]
        extra = {"postprocess": {"whiten": whiten}, "scores": None}
        manifest = make_manifest(x[rows], "Flat", "fp", "small", 32, folder, 0, (part, parts), extra)
        out = folder / f"s{part}"
        with writer_lock(out):
            write_generation(out, 1, manifest, x[rows], np.arange(len(rows)), files, [], encoder_file)
        dirs.append(out)
    return dirs, x


def peak_bytes(work):
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_on_disk_merge_grows_by_the_file_listing_not_by_the_vectors_and_equals_the_in_memory_merge(
    tmp_path, monkeypatch
):
    dim = 256  # 1 KB a vector: well above the listing's few hundred bytes a file
    encoder_file = tmp_path / "encoder.pt"
    save_encoder(Encoder("small", dim, 32), encoder_file, (0.5,) * 3, (0.25,) * 3)
    monkeypatch.setattr(ondisk, "BLOCK", 1024)
    monkeypatch.setattr("instret.faiss_boundary.TRAIN_SAMPLE", 2048)  # fixed costs at any size
    monkeypatch.setattr("instret.calibration.TAIL_PAIRS", 20_000)
    monkeypatch.setattr("instret.calibration.copy_scores", lambda *a, **k: np.empty(0, np.float32))

    def peaks(count):
        folder = tmp_path / str(count)
        folder.mkdir()
        dirs, x = synthetic_shards(folder, encoder_file, count, 4, dim=dim, whiten=True)
        got = []
        for name, fill in (("disk", ondisk.merge_on_disk), ("memory", _merge_in_memory)):
            shards, out = [SearchIndex(d) for d in dirs], folder / name
            with writer_lock(out):
                got.append(peak_bytes(functools.partial(fill, shards, out, "IVF16,Flat", None, True, None)))
        return folder, x, got

    _, _, (disk_small, memory_small) = peaks(10_000)
    folder, x, (disk_large, memory_large) = peaks(30_000)
    vector_bytes = 20_000 * dim * 4
    # The on-disk merge grows by less than the vectors themselves (their copy is on disk), and by
    # under a quarter of the in-memory merge's growth (vectors, their searched copy, the index).
    assert disk_large - disk_small < min(vector_bytes, (memory_large - memory_small) / 4), (
        disk_small,
        disk_large,
        memory_small,
        memory_large,
    )
    disk, memory = SearchIndex(folder / "disk"), SearchIndex(folder / "memory")
    np.testing.assert_allclose(disk.whitening.projection, memory.whitening.projection, atol=1e-6)
    np.testing.assert_array_equal(disk.vectors()[0], memory.vectors()[0])
    queries = x[:200]
    want, got = exact_neighbours(folder / "memory", queries, 10), exact_neighbours(folder / "disk", queries, 10)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    assert (got[1][:, 0] == want[1][:, 0]).all()
    assert disk.manifest["scores"]["unrelated"] == pytest.approx(memory.manifest["scores"]["unrelated"], abs=1e-5)


def test_a_merge_into_an_index_keeps_the_ids_it_gave_and_numbers_new_files_after_them(trained_run, tmp_path):
    photos = make_photos(tmp_path / "photos", per_group=5)
    build_index(photos, trained_run, tmp_path / "m", **QUIET)  # ids 0..14 in path order
    before = {p: i for p, (i, _) in vectors_by_path(tmp_path / "m").items()}
    (photos / "a" / "001.jpg").unlink()
    shutil.copy(photos / "b" / "000.jpg", photos / "a" / "000b.jpg")  # new, sorts among the old paths
    for i in range(2):
        build_index(photos, trained_run, tmp_path / f"s{i}", shard=(i, 2), **QUIET)
    merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m", "IVF2,Flat")
    got = {p: i for p, (i, _) in vectors_by_path(tmp_path / "m").items()}
    assert sorted(before.values()) == list(range(15))
    assert got == {**{p: i for p, i in before.items() if p != "a/001.jpg"}, "a/000b.jpg": 15}


def test_the_listing_streams_in_pythons_path_order_with_names_that_are_not_utf8(tmp_path):
    from instret import metadata

    names = ["b/1.jpg", "a/\u00fc.jpg", os.fsdecode(b"a/\xff.jpg"), "a/z.jpg", os.fsdecode(b"\xfe.jpg"), "A.jpg"]
    con = metadata.open_metadata(tmp_path / "meta.sqlite")
    metadata.write_files(con, ((i, n, 1, 1, "") for i, n in enumerate(names)), [])
    assert [r[1] for r in metadata.files_in_path_order(con)] == sorted(names)


def test_whitening_summed_block_by_block_equals_the_fit_on_every_row():
    x = np.random.default_rng(1).normal(size=(3000, 8)) * np.arange(1, 9)
    moments = Moments(8)
    for start, stop in ((0, 7), (7, 1000), (1000, 3000)):
        moments.add(x[start:stop])
    whole, summed = fit_whitening(x), moments.whitening()
    np.testing.assert_allclose(summed.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(summed.projection, whole.projection, rtol=1e-8, atol=1e-10)


def test_a_failed_on_disk_merge_leaves_the_index_as_it_was(trained_run, tmp_path, monkeypatch):
    photos = make_photos(tmp_path / "photos", per_group=6)
    for i in range(2):
        build_index(photos, trained_run, tmp_path / f"s{i}", shard=(i, 2), **QUIET)
    merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m", "IVF2,Flat")
    before = vectors_by_path(tmp_path / "m")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("instret.faiss_boundary.merge_lists_on_disk", full_disk)
    with pytest.raises(InstretError, match="No space left on device.*unchanged"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m", "IVF2,Flat")
    assert vectors_by_path(tmp_path / "m").keys() == before.keys()
    assert not (tmp_path / "m" / ondisk.SCRATCH).exists()
