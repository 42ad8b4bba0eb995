"""instret.live_index: the generation a server searches, switched between requests."""

import faiss

from instret.indexer import build_index
from instret.live_index import LiveSearcher


def test_switches_when_a_new_generation_is_committed_and_not_before(indexed, trained_run):
    photos, ix = indexed
    said = []
    live = LiveSearcher(ix, log=said.append)
    first = live.current()
    assert live.current() is first and first.index.generation == "gen-000001" and said == []
    (photos / "a" / "000.jpg").unlink()
    build_index(photos, trained_run, ix, workers=0, device="cpu")
    second = live.current()
    assert second is not first and second.index.generation == "gen-000002" and second.index.ntotal == 29
    assert live.current() is second and said == ["switched from gen-000001 to gen-000002"]
    # the Searcher a request took before the switch still answers, from its own generation
    assert first.index.ntotal == 30 and len(first.query(ids=[0], k=30)[0]["results"]) == 30


def test_a_damaged_new_generation_is_reported_once_and_the_old_one_serves_on(indexed):
    photos, ix = indexed
    said = []
    live = LiveSearcher(ix, log=said.append)
    damaged = ix / "gen-000009"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{not json")
    (ix / "CURRENT").write_text("gen-000009\n")
    for _ in range(3):
        assert live.current().index.generation == "gen-000001"
    assert len(said) == 1 and said[0].startswith("kept serving gen-000001: ") and "not valid JSON" in said[0]


def test_nprobe_of_one_request_does_not_stay(indexed, trained_run, tmp_path):
    photos, _ = indexed
    ivf = tmp_path / "ivf"
    build_index(photos, trained_run, ivf, "IVF4,Flat", workers=0, device="cpu")
    live = LiveSearcher(ivf)
    searcher = live.current()
    nprobe = lambda s: faiss.extract_index_ivf(s.index.faiss_index()).nprobe
    assert nprobe(searcher) == 16
    assert live.run(searcher, nprobe, nprobe=2) == 2
    assert nprobe(searcher) == 16
