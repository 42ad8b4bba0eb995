import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from instret import indexer
from instret.duplicates import find_duplicates
from instret.encoder import Encoder, save_encoder
from instret.errors import InstretError
from instret.faiss_boundary import make_faiss_index
from instret.index import SearchIndex, writer_lock
from instret.indexer import build_index
from instret.searcher import Searcher, query, retrieval_metrics
from instret.shards import merge_shards
from tests.conftest import make_photos

QUIET = dict(workers=0, device="cpu")


@pytest.fixture
def photos(tmp_path):
    return make_photos(tmp_path / "photos", per_group=8)


def vectors_by_path(index_dir):
    index = SearchIndex(index_dir)
    vectors, ids = index.vectors()
    row = {int(i): r for r, i in enumerate(ids)}
    return {path: (i, np.asarray(vectors[row[i]])) for i, path, *_ in index.files()}


def test_each_indexed_image_finds_itself_first_with_score_one(photos, trained_run, tmp_path):
    summary = build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    assert summary["vectors"] == 24 and summary["encoded"] == 24
    images = sorted(str(p) for p in photos.rglob("*.jpg"))
    results = query(tmp_path / "ix", images, k=3)
    for r in results:
        top = r["results"][0]
        assert top["path"] == str(Path(r["query"]).resolve())
        assert top["score"] == pytest.approx(1.0, abs=1e-5)
        assert [h["rank"] for h in r["results"]] == [1, 2, 3]
        assert all(a["score"] >= b["score"] for a, b in zip(r["results"], r["results"][1:]))


def test_exclude_self_and_min_score(photos, trained_run, tmp_path):
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    q = str(photos / "a" / "000.jpg")
    res = query(tmp_path / "ix", [q], k=5, exclude_self=True)[0]["results"]
    assert len(res) == 5 and all(not h["path"].endswith("a/000.jpg") for h in res)
    top_score = query(tmp_path / "ix", [q], k=5, exclude_self=True)[0]["results"][0]["score"]
    assert query(tmp_path / "ix", [q], k=5, exclude_self=True, min_score=top_score + 1e-6)[0]["results"] == []


def test_augmented_copy_finds_its_original_among_distractors(trained_run, tmp_path):
    photos = trained_run.parent / "photos"  # the collection the encoder learned from, as in `train` then `query`
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    names = [p.relative_to(photos).as_posix() for p in sorted(photos.rglob("*.jpg"))][::3]
    found = []
    for name in names:
        img = Image.open(photos / name)
        w, h = img.size
        copy = img.crop((2, 2, w - 3, h - 2)).resize((w, h))
        copy = ImageEnhance.Brightness(copy).enhance(1.05)
        copy.save(tmp_path / "copy.png")
        top = query(tmp_path / "ix", [tmp_path / "copy.png"], k=1)[0]["results"][0]["path"]
        found.append(top.endswith(name))
    assert sum(found) >= 0.9 * len(found), found


def test_incremental_update_equals_fresh_build_and_keeps_ids(photos, trained_run, tmp_path):
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    before = vectors_by_path(tmp_path / "ix")
    # add two, modify one, delete one, touch one without changing it
    shutil.copy(photos / "a" / "001.jpg", photos / "c" / "new1.jpg")
    make_photos(tmp_path / "more", groups=("n",), per_group=1, seed=9)
    shutil.copy(tmp_path / "more" / "n" / "000.jpg", photos / "b" / "new2.jpg")
    Image.open(photos / "b" / "002.jpg").rotate(90).save(photos / "b" / "002.jpg")
    (photos / "c" / "003.jpg").unlink()
    (photos / "a" / "004.jpg").touch()
    summary = build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    assert (summary["encoded"], summary["removed"], summary["vectors"]) == (3, 1, 25)
    build_index(photos, trained_run, tmp_path / "fresh", **QUIET)
    after, fresh = vectors_by_path(tmp_path / "ix"), vectors_by_path(tmp_path / "fresh")
    assert set(after) == set(fresh)
    for path in after:
        assert np.allclose(after[path][1], fresh[path][1], atol=1e-6), path
    for path in set(before) & set(after):
        assert after[path][0] == before[path][0]  # ids stay stable
    assert len({i for i, _ in after.values()}) == len(after)


def test_interrupted_build_resumes_without_re_encoding(photos, trained_run, tmp_path, monkeypatch):
    real_add = indexer.Staging.add
    calls = {"n": 0}

    def add_then_die(self, rows):
        real_add(self, rows)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(indexer.Staging, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_index(photos, trained_run, tmp_path / "ix", batch_size=5, **QUIET)
    assert not (tmp_path / "ix" / "CURRENT").exists()
    monkeypatch.setattr(indexer.Staging, "add", real_add)
    summary = build_index(photos, trained_run, tmp_path / "ix", batch_size=5, **QUIET)
    assert summary["resumed"] == 10 and summary["encoded"] == 14 and summary["vectors"] == 24
    assert not (tmp_path / "ix" / "staging.sqlite").exists()
    build_index(photos, trained_run, tmp_path / "fresh", **QUIET)
    a, b = vectors_by_path(tmp_path / "ix"), vectors_by_path(tmp_path / "fresh")
    assert all(np.allclose(a[p][1], b[p][1], atol=1e-6) for p in a)


def test_other_encoder_is_refused(photos, trained_run, tmp_path):
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    save_encoder(Encoder("small", 128, 32), tmp_path / "other.pt", (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(InstretError, match="--rebuild"):
        build_index(photos, tmp_path / "other.pt", tmp_path / "ix", **QUIET)
    with pytest.raises(InstretError, match="not the encoder"):
        Searcher(tmp_path / "ix", model=tmp_path / "other.pt")
    summary = build_index(photos, tmp_path / "other.pt", tmp_path / "ix", rebuild=True, **QUIET)
    assert summary["encoded"] == 24


def test_dimension_mismatch_is_refused(photos, trained_run, tmp_path):
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    index = SearchIndex(tmp_path / "ix")
    with pytest.raises(InstretError, match="dimension"):
        index.search(np.ones((1, 64), dtype=np.float32), 3)


def test_planted_duplicates_are_found_and_nothing_else(photos, trained_run, tmp_path):
    shutil.copy(photos / "a" / "002.jpg", photos / "b" / "dup_of_a2.jpg")
    shutil.copy(photos / "c" / "005.jpg", photos / "a" / "dup_of_c5.jpg")
    shutil.copy(photos / "c" / "005.jpg", photos / "b" / "dup2_of_c5.jpg")
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    groups = find_duplicates(tmp_path / "ix", threshold=0.99999)["groups"]
    names = [sorted(m["path"].split("photos/")[1] for m in g["members"]) for g in groups]
    assert names == [["a/dup_of_c5.jpg", "b/dup2_of_c5.jpg", "c/005.jpg"], ["a/002.jpg", "b/dup_of_a2.jpg"]]
    assert [g["tier"] for g in groups] == ["exact", "exact"]  # byte copies
    # and the threshold is meaningful: distinct photos stay below it
    index = SearchIndex(tmp_path / "ix")
    v, _ = index.vectors()
    sims = np.asarray(v) @ np.asarray(v).T
    assert (sims > 0.99999).sum() == len(v) + 2 * (1 + 3)


def test_retrieval_metrics_hand_computed():
    # 4 items on a line: labels 0,0,1,1; item 0 ranks others 1 (rel), 2, 3 -> AP 1
    v = np.array([[1, 0], [0.9, 0.1], [0.1, 0.9], [0, 1]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    m = retrieval_metrics(v, labels)
    assert m["mAP"] == pytest.approx(1.0) and m["recall@1"] == 1.0 and m["queries"] == 4
    # swap one label: item ranks become partially wrong
    labels = np.array([0, 1, 0, 1])
    m = retrieval_metrics(v, labels)
    # q0: ranked 1(0),2(1),3(0) -> AP=1/2; q1: 0(0),2(1)... relevant {3}: ranked 0,2,3 -> AP=1/3
    # q2: ranked 3,1,0 relevant {0} at rank 3 -> 1/3; q3: ranked 2,1,0 relevant {1} at rank 2 -> 1/2
    assert m["mAP"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    assert m["recall@1"] == 0.0 and m["recall@5"] == 1.0
    assert m["precision@10"] == pytest.approx((1 / 10) * 1)  # one relevant each in the top 10


def test_second_writer_is_refused(tmp_path):
    with writer_lock(tmp_path / "ix"):
        with pytest.raises(InstretError, match="another"):
            with writer_lock(tmp_path / "ix"):
                pass


def test_bad_files_are_skipped_counted_and_listed(photos, trained_run, tmp_path):
    (photos / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (photos / "a" / "empty.png").write_bytes(b"")
    summary = build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    assert summary["skipped"] == 2 and summary["vectors"] == 24
    from instret.info import index_info

    info = index_info(tmp_path / "ix")
    assert info["skipped"] == 2 and {f["path"] for f in info["skipped_files"]} == {"a/broken.jpg", "a/empty.png"}


# PQ4x4 (16 centroids a sub-vector): PQ4 trains 256 on 400 points, 8 s of the suite for the same check.
@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW8", "IVF2,PQ4x4"])
def test_factory_layouts_search_close_to_exact(factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(400) * 3 + 7
    index = make_faiss_index(x, ids, factory)
    _, got = index.search(x[:20], 1)
    if factory == "Flat":
        assert (got[:, 0] == ids[:20]).all()
    else:
        assert (got[:, 0] == ids[:20]).mean() >= 0.5  # approximate layouts, but ids are ours


def test_bad_factory_string_is_one_clear_error():
    with pytest.raises(InstretError, match="factory"):
        make_faiss_index(np.zeros((4, 8), dtype=np.float32), np.arange(4), "NotAnIndex42")


def test_sharded_build_then_merge_equals_a_single_build(photos, trained_run, tmp_path, capsys):
    from tests.test_cli import run_cli

    whole = build_index(photos, trained_run, tmp_path / "whole", batch_size=5, **QUIET)
    for i in range(3):
        code, _, err = run_cli(
            [
                "index",
                str(photos),
                "--model",
                str(trained_run),
                "--out",
                str(tmp_path / f"s{i}"),
                "--shard",
                f"{i}/3",
                *"--workers 0 --batch-size 3".split(),
            ],
            capsys,
        )
        assert code == 0, err
    sizes = [SearchIndex(tmp_path / f"s{i}").ntotal for i in range(3)]
    assert sum(sizes) == whole["vectors"] == 24 and max(sizes) - min(sizes) <= 1
    code, out, err = run_cli(
        ["merge-index", *(str(tmp_path / f"s{i}") for i in (2, 0, 1)), "--out", str(tmp_path / "merged")], capsys
    )
    assert code == 0, err
    a, b = vectors_by_path(tmp_path / "whole"), vectors_by_path(tmp_path / "merged")
    assert sorted(a) == sorted(b)
    for path, (i, v) in a.items():
        assert b[path][0] == i and np.allclose(b[path][1], v, atol=1e-5), path
    hits = Searcher(tmp_path / "merged").query([photos / "b" / "003.jpg"], k=1)[0]["results"]
    assert hits[0]["path"].endswith("b/003.jpg") and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_merge_refuses_missing_or_foreign_shards(photos, trained_run, tmp_path):
    from instret.shards import parse_shard

    for i in range(2):
        build_index(photos, trained_run, tmp_path / f"s{i}", shard=(i, 2), **QUIET)
    build_index(photos, trained_run, tmp_path / "whole", **QUIET)
    with pytest.raises(InstretError, match=r"shards \[0\] of 2"):
        merge_shards([tmp_path / "s0"], tmp_path / "m")
    with pytest.raises(InstretError, match="not a shard"):
        merge_shards([tmp_path / "s0", tmp_path / "whole"], tmp_path / "m")
    with pytest.raises(InstretError, match="holds shard"):
        build_index(photos, trained_run, tmp_path / "s0", shard=(1, 2), **QUIET)
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(InstretError, match="--shard"):
            parse_shard(bad)
    assert not (tmp_path / "m").exists()


def test_search_breadth_reaches_the_layouts_inside_the_id_map():
    import faiss

    from instret.defaults import EF_SEARCH as DEFAULT_EF_SEARCH
    from instret.defaults import NPROBE as DEFAULT_NPROBE
    from instret.faiss_boundary import set_search_breadth

    x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # inner product on unit vectors: each is its own best
    ivf, hnsw, flat = (make_faiss_index(x, np.arange(2000), f) for f in ("IVF32,Flat", "HNSW8", "Flat"))
    for index in (ivf, hnsw, flat):
        set_search_breadth(index)
    assert faiss.downcast_index(ivf.index).nprobe == DEFAULT_NPROBE
    assert faiss.downcast_index(hnsw.index).hnsw.efSearch == DEFAULT_EF_SEARCH
    set_search_breadth(ivf, nprobe=32)  # every list: IVF search becomes exact
    _, got = ivf.search(x[:50], 1)
    assert (got[:, 0] == np.arange(50)).all()


def test_the_gpu_copy_is_made_only_when_asked_and_where_faiss_gpu_serves_it(photos, trained_run, tmp_path, monkeypatch):
    # faiss-gpu seeing one GPU, faked: the cloner records what it is given and hands the CPU
    # index back, so every search still runs.
    import faiss

    from instret import index as index_module

    cloned = []
    monkeypatch.setattr(index_module, "faiss_gpu_count", lambda: 1)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", type("Options", (), {}), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda idx, options: cloned.append(idx) or idx, raising=False)
    build_index(photos, trained_run, tmp_path / "flat", **QUIET)
    build_index(photos, trained_run, tmp_path / "hnsw", factory="HNSW32", **QUIET)
    v = np.asarray(SearchIndex(tmp_path / "flat").vectors()[0][:2])

    SearchIndex(tmp_path / "flat").search(v, 3)  # a CPU query (query --device cpu)
    assert cloned == []
    on_gpu = SearchIndex(tmp_path / "flat", gpu=True)
    on_gpu.search(v, 3)
    on_gpu.search(v, 5)
    assert len(cloned) == 1  # made once, then kept
    on_gpu.search(v, 4096)  # above FAISS GPU's k limit: the CPU index answers
    SearchIndex(tmp_path / "hnsw", gpu=True).search(v, 3)  # HNSW does not run on FAISS's GPUs
    for i in range(2):
        build_index(photos, trained_run, tmp_path / f"s{i}", shard=(i, 2), **QUIET)
    merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "ivf-on-disk", "IVF2,Flat")
    SearchIndex(tmp_path / "ivf-on-disk", gpu=True).search(v, 3)  # lists on disk stay there
    assert len(cloned) == 1
    assert Searcher(tmp_path / "flat", device="cpu").index.gpu is False


def test_cpu_encoding_leaves_the_decoding_workers_their_cores(trained_run, tmp_path, monkeypatch):
    from instret import encoder, indexer

    seen = []
    real = encoder.embed_images  # what the encoding of each decoded batch runs
    monkeypatch.setattr(
        encoder, "embed_images", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1]
    )
    monkeypatch.setattr(indexer, "usable_cpus", lambda: 3)
    # The edited copies the calibration encodes after the build, with every thread back: not this test's.
    monkeypatch.setattr("instret.calibration.copy_scores", lambda *a, **k: np.empty(0, np.float32))
    torch.set_num_threads(2)
    indexer.build_index(trained_run.parent / "photos", trained_run, tmp_path / "w2", workers=2, device="cpu")
    assert seen and set(seen) == {1}  # 3 cores, 2 decoding: 1 for the encoder
    assert torch.get_num_threads() == 2  # restored
    seen.clear()
    indexer.build_index(trained_run.parent / "photos", trained_run, tmp_path / "w0", workers=0, device="cpu")
    assert set(seen) == {2}  # no workers: the encoder keeps every thread
