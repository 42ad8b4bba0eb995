"""The index's post-processing and score distributions: fitted at build time, stored with each
generation, applied to queries the same way, and absent from older indexes without harm."""

import json

import numpy as np
import pytest

from instret import postprocess
from instret.calibration import describe
from instret.index import WHITENING, SearchIndex
from instret.indexer import build_index
from instret.searcher import query
from tests.conftest import make_photos

QUIET = dict(workers=0, device="cpu")


@pytest.fixture
def whitened(tmp_path, trained_run, monkeypatch):
    monkeypatch.setattr(postprocess, "MIN_VECTORS", 20)  # whiten the 30-image test collection too
    photos = make_photos(tmp_path / "photos", per_group=10, seed=3)
    build_index(photos, trained_run, tmp_path / "ix", whiten=True, **QUIET)
    return photos, tmp_path / "ix"


def _reference_ranking(db, q, s):
    """Whitening written out from np.cov and the SVD of that (symmetric) matrix, then cosine."""
    mean = db.astype(np.float64).mean(axis=0)
    u, lam, _ = np.linalg.svd(np.cov(db.T))
    shrunk = (1 - s) * lam + s * lam.mean()
    w = u @ np.diag(shrunk**-0.5) @ u.T

    def white(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)  # queries are unit vectors, as the encoder gives
        y = (x - mean) @ w
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    return np.argsort(-(white(q) @ white(db).T), axis=1, kind="stable")


def test_queries_are_ranked_as_a_numpy_whitening_of_the_collection_ranks_them(whitened):
    photos, ix = whitened
    index = SearchIndex(ix)
    assert (index.gen_dir / WHITENING).is_file()
    assert index.manifest["postprocess"]["whitening"]["fitted_on"] == 30
    vectors, ids = index.vectors()
    db = np.asarray(vectors)
    queries = db[:5] + np.random.default_rng(0).normal(0, 0.01, db[:5].shape)
    want = _reference_ranking(db, queries, index.manifest["postprocess"]["whitening"]["shrinkage"])[:, :5]
    got = [[h.id for h in hits] for hits in index.search(queries, 5)]
    assert got == [[int(ids[r]) for r in row] for row in want]


def test_each_generation_carries_its_own_whitening_and_a_new_file_refits_it(whitened):
    photos, ix = whitened
    first = SearchIndex(ix)
    make_photos(photos / "new", groups=("z",), per_group=4, seed=9)
    summary = build_index(photos, first.gen_dir / "encoder.pt", ix, **QUIET)
    second = SearchIndex(ix)
    assert summary["encoded"] == 4 and second.generation != first.generation
    assert second.manifest["postprocess"]["whitening"]["fitted_on"] == 34
    assert not np.allclose(second.whitening.mean, first.whitening.mean)
    # The previous generation is kept whole, with the whitening it was searched with.
    again = SearchIndex(ix, generation=first.generation)
    np.testing.assert_array_equal(again.whitening.projection, first.whitening.projection)


def test_an_index_built_before_post_processing_still_loads_and_searches_plain_cosine(whitened):
    photos, ix = whitened
    index = SearchIndex(ix)
    manifest = dict(index.manifest)
    del manifest["postprocess"], manifest["scores"]  # what an older instret wrote
    (index.gen_dir / "manifest.json").write_text(json.dumps(manifest))
    (index.gen_dir / WHITENING).unlink()
    db, ids = index.vectors()
    db = np.asarray(db)
    import faiss

    plain = faiss.IndexIDMap2(faiss.IndexFlatIP(db.shape[1]))
    plain.add_with_ids(db, ids)
    (index.gen_dir / "index.faiss").unlink()
    faiss.write_index(plain, str(index.gen_dir / "index.faiss"))
    old = SearchIndex(ix)
    assert old.whitening is None and old.postprocess == {}
    hits = old.search(db[:3], 3)
    assert [h[0].id for h in hits] == [int(i) for i in ids[:3]]
    assert [round(h.score, 4) for h in hits[0]] == [round(float(s), 4) for s in np.sort(db @ db[0])[::-1][:3]]
    result = query(ix, [str(sorted(photos.rglob("*.jpg"))[0])], k=2)[0]["results"][0]
    assert set(result) == {"rank", "id", "path", "score", "missing"}  # no score distributions to describe it with


@pytest.mark.parametrize("asked", [True, False])
def test_the_whitening_choice_is_kept_for_the_next_build(tmp_path, trained_run, monkeypatch, asked):
    monkeypatch.setattr(postprocess, "MIN_VECTORS", 20)
    photos = make_photos(tmp_path / "photos", per_group=10, seed=4)
    build_index(photos, trained_run, tmp_path / "ix", whiten=asked, **QUIET)
    make_photos(photos / "more", groups=("y",), per_group=2, seed=5)
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    index = SearchIndex(tmp_path / "ix")
    assert index.postprocess["whiten"] is asked and (index.whitening is not None) is asked


def test_a_new_index_does_not_whiten_unless_asked(tmp_path, trained_run, monkeypatch):
    monkeypatch.setattr(postprocess, "MIN_VECTORS", 20)
    build_index(make_photos(tmp_path / "photos", per_group=10, seed=6), trained_run, tmp_path / "ix", **QUIET)
    index = SearchIndex(tmp_path / "ix")
    assert postprocess.WHITEN_BY_DEFAULT is False
    assert index.manifest["postprocess"] == {"whiten": False} and index.whitening is None


def test_hits_say_how_unusual_their_score_is_for_the_index(whitened):
    photos, ix = whitened
    index = SearchIndex(ix)
    scores = index.manifest["scores"]
    assert scores["unrelated_pairs"] == 20_000 and scores["copies_measured"] == 30
    assert all(a <= b for a, b in zip(scores["unrelated"], scores["unrelated"][1:]))
    results = query(ix, [str(p) for p in sorted(photos.rglob("*.jpg"))[:3]], k=5)
    for r in results:
        hits = r["results"]
        # The query itself (score 1) is above almost every unrelated pair; lower scores are less unusual.
        assert hits[0]["unrelated_above"] <= 1 / 20_000
        assert all(a["unrelated_above"] <= b["unrelated_above"] for a, b in zip(hits, hits[1:]))
        assert all(a["copies_below"] >= b["copies_below"] for a, b in zip(hits, hits[1:]))


def test_describe_reads_shares_off_the_quantiles():
    levels = np.linspace(0, 1, 201)
    uniform = {"unrelated": list(levels), "unrelated_pairs": 1000, "copies": list(levels)}
    assert describe(0.25, uniform)["unrelated_above"] == pytest.approx(0.75)
    assert describe(0.25, uniform)["copies_below"] == pytest.approx(0.25)
    # Above the 99th percentile the tail is a power of 1 - score; for a uniform one it is exact.
    assert describe(0.995, uniform)["unrelated_above"] == pytest.approx(0.005)
    assert describe(0.9999, uniform)["unrelated_above"] == pytest.approx(0.0001)
    assert describe(1.5, uniform) == {"unrelated_above": 0.0, "copies_below": 1.0}
    assert describe(-1.0, uniform)["unrelated_above"] == 1.0
    assert describe(0.3, None) == {}


@pytest.mark.parametrize("added, whiten, measured_again", [(2, False, False), (6, False, True), (2, True, True)])
def test_a_small_update_keeps_the_edited_copy_scores(tmp_path, trained_run, monkeypatch, added, whiten, measured_again):
    from instret import calibration

    monkeypatch.setattr(postprocess, "MIN_VECTORS", 20)
    photos = make_photos(tmp_path / "photos", per_group=10, seed=7)
    build_index(photos, trained_run, tmp_path / "ix", whiten=whiten, **QUIET)
    before = SearchIndex(tmp_path / "ix").manifest["scores"]
    calls = []
    real = calibration.copy_scores
    monkeypatch.setattr(calibration, "copy_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    make_photos(photos / "more", groups=("z",), per_group=added, seed=8)  # 2 of 32 files: under a tenth
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    after = SearchIndex(tmp_path / "ix").manifest["scores"]
    assert bool(calls) is measured_again
    if not measured_again:
        assert after["copies"] == before["copies"] and after["copies_measured"] == before["copies_measured"]
    assert after["unrelated"] != before["unrelated"]  # the unrelated pairs are always measured anew
