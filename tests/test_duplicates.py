"""Near-duplicates: the calibrated threshold, groups that never chain, the kept member, and moves
that lose nothing (undo, a kill mid-move, odd file names)."""

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instret.calibration import LEVELS, TAIL_LEVELS, score_for_unrelated_share, unrelated_share
from instret.duplicates import KEEP_RULES, candidate_pairs, complete_linkage, find_duplicates, threshold_for_precision
from instret.errors import InstretError
from instret.index import SearchIndex
from instret.indexer import build_index
from tests.test_cli import run_cli
from tests.test_interruption import FAULTY

QUIET = {"workers": 0, "device": "cpu"}


def power_tail(dimension: float, far: bool = True) -> dict:
    """Unrelated scores s with P(s >= t) = (1 - t) ** dimension on [0, 1], as stored quantiles
    (with the far tail's, or as an index built before they were stored)."""
    quantile = lambda level: 1 - (1 - np.asarray(level)) ** (1 / dimension)
    stored = {"unrelated": list(quantile(LEVELS)), "unrelated_pairs": 20_000}
    return {**stored, "tail": list(quantile(TAIL_LEVELS)), "tail_pairs": 10**6} if far else stored


@pytest.mark.parametrize("far", [True, False])
def test_the_unrelated_tail_is_extrapolated_as_a_power_of_the_distance(far):
    tail = power_tail(3.0, far)
    # Read off the quantiles below the 99th percentile, extrapolated above it: exact for a power law.
    assert unrelated_share(1 - 0.5 ** (1 / 3), tail) == pytest.approx(0.5, rel=1e-3)
    assert unrelated_share(0.999, tail) == pytest.approx(1e-9, rel=1e-6)
    assert unrelated_share(np.array([0.99, 0.999]), tail) == pytest.approx([1e-6, 1e-9], rel=1e-6)
    assert score_for_unrelated_share(1e-9, tail) == pytest.approx(0.999, abs=1e-9)


def test_the_threshold_is_the_lowest_score_still_precise_enough():
    tail = power_tail(3.0)  # with 1,001 images (500,500 pairs): 0.5 unrelated pairs expected above 0.99
    contents = 1001
    scores = np.array([0.999, 0.998, 0.997, 0.995, 0.99, 0.95, 0.9])
    # Expected unrelated above t: 500,500 * (1 - t)^3 -> 0.0005, 0.004, 0.0135, 0.0626, 0.5005, 62.6, 500.5
    found = threshold_for_precision(scores, contents, tail, precision=0.9)
    # At 0.99: 5 pairs, 0.5 expected unrelated: precision 0.8999 < 0.9; at 0.995 it is 0.984.
    assert found == {"threshold": 0.995, "pairs": 4, "expected_unrelated": 0.06}
    assert threshold_for_precision(scores, contents, tail, precision=0.85)["threshold"] == 0.99
    # One pair at 0.99 alone would be doubtful (0.5 expected unrelated), but with 99 more at
    # 0.989 (0.67 expected unrelated among 100) the lot is 99.3 % precise: step-up takes them all.
    crowd = threshold_for_precision(np.array([0.99] + [0.989] * 99), contents, tail, precision=0.99)
    assert crowd == {"threshold": 0.989, "pairs": 100, "expected_unrelated": 0.67}
    # Nothing precise enough: the score at which a single pair would be.
    alone = threshold_for_precision(np.array([0.9]), contents, tail, precision=0.99)
    assert alone["pairs"] == 0 and alone["threshold"] == pytest.approx(1 - (0.01 / 500_500) ** (1 / 3), abs=1e-6)


def test_the_far_tail_sees_structure_rarer_than_one_pair_in_a_hundred():
    # Unrelated scores around 0, but one pair in 500 from the same cluster (bursts of similar
    # photos): the 95th and 99th percentiles miss it, the 99.9th of a million pairs does not.
    from instret.calibration import unrelated_scores, unrelated_tail

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 128))[rng.integers(0, 500, 4000)] + rng.standard_normal((4000, 128))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    stored = {"unrelated": list(np.quantile(unrelated_scores(x), LEVELS)), "unrelated_pairs": 20_000}
    truth = ((x @ x.T)[np.triu_indices(4000, 1)] >= 0.6).mean()  # 1.1e-4
    assert unrelated_share(0.6, stored) < truth / 1000  # the old fit: 5e-9
    assert truth / 2 < unrelated_share(0.6, {**stored, **unrelated_tail(x)}) < truth * 5  # 3.4e-4: errs high


def test_a_chain_is_not_a_group():
    # a~b and b~c but not a~c: the stronger pair forms a group, the third stays out.
    a, b, s = np.array([0, 1, 0]), np.array([1, 2, 2]), np.array([0.98, 0.97, 0.5])
    assert complete_linkage(a, b, s, 0.95) == [[0, 1]]
    # all three pairs above the threshold: one group
    assert complete_linkage(a, b, np.array([0.98, 0.97, 0.96]), 0.95) == [[0, 1, 2]]


def test_groups_are_cliques_disjoint_and_none_could_merge():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 12
        pairs = [(i, j) for i, j in itertools.combinations(range(n), 2) if rng.random() < 0.35]
        a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        s = rng.uniform(0.9, 1.0, len(pairs))
        groups = complete_linkage(a, b, s, 0.93)
        linked = {p for p, v in zip(pairs, s) if v >= 0.93}
        members = [m for g in groups for m in g]
        assert len(members) == len(set(members))  # one group per row
        for g in groups:
            assert len(g) >= 2 and all(p in linked for p in itertools.combinations(g, 2))
        for g, h in itertools.combinations(groups, 2):  # maximal: no two groups could be one
            assert not all((min(x, y), max(x, y)) in linked for x in g for y in h)


def brute_within(database):
    def within(queries, radius):
        sims = queries @ database.T
        rows, ids = np.nonzero(sims > radius)
        return rows, ids.astype(np.int64), sims[rows, ids].astype(np.float32)

    return within


def test_candidate_pairs_in_blocks_equal_the_full_matrix():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x[150:170] = x[:20] + 0.2 * rng.standard_normal((20, 16))  # planted near pairs
    x[200] = x[5]  # a byte copy: the same content as row 5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rep_row = np.arange(300)
    rep_row[200] = 5
    a, b, s = candidate_pairs(brute_within(x), x, 0.6, rep_row=rep_row, block=64)
    sims = x @ x.T
    expected = {(i, j) for i, j in zip(*np.nonzero(sims > 0.6)) if i < j and 200 not in (i, j)}
    assert set(zip(a.tolist(), b.tolist())) == expected and len(a) == len(expected)
    assert np.allclose(s, sims[a, b], atol=1e-6)
    # At most the 3 best per row: a pair survives when it is among the 3 best of either end.
    a, b, s = candidate_pairs(brute_within(x), x, 0.0, rep_row=rep_row, block=64, per_image=3)
    np.fill_diagonal(sims, -np.inf)
    sims[200], sims[:, 200] = -np.inf, -np.inf
    best3 = np.argsort(-sims, axis=1)[:, :3]
    expected = {(min(i, j), max(i, j)) for i in range(300) if i != 200 for j in best3[i] if sims[i, j] > 0}
    assert set(zip(a.tolist(), b.tolist())) == expected


def test_keep_rule_names_match_the_command_line():
    from instret.cli.search import KEEP_CHOICES

    assert KEEP_CHOICES == list(KEEP_RULES)


# --- on a real index ----------------------------------------------------------------------


@pytest.fixture
def collection(trained_run, tmp_path):
    """The trained run's photos plus a byte copy, and a half-size copy of another photo."""
    photos = shutil.copytree(trained_run.parent / "photos", tmp_path / "photos")
    shutil.copy(photos / "a" / "002.jpg", photos / "b" / "copy of a2.jpg")
    img = Image.open(photos / "c" / "005.jpg")
    img.resize((img.width // 2, img.height // 2)).save(photos / "a" / "small c5.png")
    os.utime(photos / "a" / "small c5.png", (1e9, 1e9))  # older than the original
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    return photos, tmp_path / "ix"


def test_exact_and_near_tiers_and_the_kept_member(collection):
    photos, ix = collection
    sims = _score(ix, photos / "c" / "005.jpg", photos / "a" / "small c5.png")
    found = find_duplicates(ix, threshold=sims - 1e-4)
    by_keep = {Path(g["keep"]).name: g for g in found["groups"]}
    exact = [g for g in found["groups"] if g["tier"] == "exact"]
    assert len(exact) == 1 and {Path(m["path"]).name for m in exact[0]["members"]} == {"002.jpg", "copy of a2.jpg"}
    assert all(m["identical"] and m["score"] == 1.0 for m in exact[0]["members"])
    near = by_keep["005.jpg"]  # the larger image is kept, though the small copy is older
    assert near["tier"] == "near" and [Path(m["path"]).name for m in near["members"]] == ["005.jpg", "small c5.png"]
    assert near["members"][1]["score"] == pytest.approx(sims, abs=1e-5)
    assert (near["members"][0]["width"], near["members"][1]["width"]) == (48, 24)
    oldest = find_duplicates(ix, threshold=sims - 1e-4, keep="oldest")
    assert any(Path(g["keep"]).name == "small c5.png" for g in oldest["groups"])
    assert found["reason"].startswith("--threshold")


def _score(ix, p, q) -> float:
    index = SearchIndex(ix)
    vectors, _ = index.vectors()
    rows = {path: r for r, (_, path, *_) in enumerate(index.files())}
    root = Path(index.manifest["root"])
    v = index.transform(np.asarray(vectors[[rows[str(p.relative_to(root))], rows[str(q.relative_to(root))]]]))
    return float(v[0] @ v[1])


def test_the_default_threshold_is_calibrated_and_says_why(collection, capsys):
    _, ix = collection
    code, out, err = run_cli(["dups", str(ix), "--json"], capsys)
    assert code == 0, err
    found = json.loads(out)
    assert found["precision"] == 0.99 and "calibrated on this index" in found["reason"]
    assert f"{found['threshold']:.4f}" in err and "exact" in err
    # the byte copy is found at any threshold
    assert any(g["tier"] == "exact" for g in found["groups"])


def test_an_index_without_score_distributions_falls_back_to_a_stated_threshold(collection):
    _, ix = collection
    index = SearchIndex(ix)
    manifest = json.loads((index.gen_dir / "manifest.json").read_text())
    del manifest["scores"]
    (index.gen_dir / "manifest.json").write_text(json.dumps(manifest))
    found = find_duplicates(ix)
    assert found["threshold"] == 0.95 and "no score distributions" in found["reason"]


def test_text_and_html_show_each_group(collection, tmp_path, capsys):
    _, ix = collection
    code, out, err = run_cli(["dups", str(ix), "--threshold", "0.9999", "--html", str(tmp_path / "d.html")], capsys)
    assert code == 0, err
    assert (
        out.startswith("# group 1: exact, 2 files")
        and "\nkeep\t1.0000\t48x48\t" in out
        and "\ndup\t1.0000\t48x48\t" in out
    )
    page = (tmp_path / "d.html").read_text()
    assert 'id="group-1"' in page and "48x48" in page and "copy of a2.jpg" in page


# --- moves --------------------------------------------------------------------------------


def snapshot(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def odd_collection(trained_run, tmp_path):
    """Photos with byte copies under names with a space, a newline and bytes that are not UTF-8."""
    photos = shutil.copytree(trained_run.parent / "photos", tmp_path / "photos")
    for n, name in enumerate([b"with space.jpg", b"new\nline.jpg", b"bad\xff\xfename.jpg"]):
        shutil.copy(photos / "a" / f"00{n}.jpg", os.fsdecode(bytes(photos / "b") + b"/" + name))
    build_index(photos, trained_run, tmp_path / "ix", **QUIET)
    return photos, tmp_path / "ix"


def test_move_then_undo_restores_every_byte_and_path(odd_collection, tmp_path, capsys):
    photos, ix = odd_collection
    before = snapshot(photos)
    # --json: stdout stays ASCII (capsys cannot read the raw bytes of a name that is not UTF-8)
    code, _, err = run_cli(
        ["dups", str(ix), "--threshold", "0.9999", "--json", "--move-to", str(tmp_path / "moved")], capsys
    )
    assert code == 0, err
    journal = next((tmp_path / "moved").glob("instret-dups-*.json"))
    assert "moved 3 file(s)" in err and str(journal) in err
    after = snapshot(photos)
    moved = snapshot(tmp_path / "moved")
    assert len(after) == len(before) - 3 and all(after[k] == before[k] for k in after)
    assert {k for k in moved if k.suffix == ".jpg"} == set(before) - set(after)  # paths under the folder kept
    code, _, err = run_cli(["dups", "--undo", str(journal)], capsys)
    assert code == 0 and "restored 3 file(s)" in err
    assert snapshot(photos) == before
    assert [p.name for p in (tmp_path / "moved").iterdir()] == [journal.name]  # emptied folders removed
    # A later --move-to does not take the undone journal for an interrupted one.
    code, _, err = run_cli(
        ["dups", str(ix), "--threshold", "0.9999", "--json", "--move-to", str(tmp_path / "moved"), "--keep", "path"],
        capsys,
    )
    assert code == 0 and "interrupted" not in err and "moved 3 file(s)" in err


def test_the_library_moves_in_one_call_what_dups_move_to_moves(odd_collection, tmp_path):
    from instret import moves

    photos, ix = odd_collection
    before = snapshot(photos)
    listed = find_duplicates(ix, threshold=0.9999)
    found = find_duplicates(ix, threshold=0.9999, move_to=tmp_path / "moved")
    assert "moves" not in listed and found["groups"] == listed["groups"]  # listing moves nothing
    done = found["moves"]
    gone = {m["path"] for g in listed["groups"] for m in g["members"] if m["path"] != g["keep"]}
    assert done["moved"] == len(gone) == 3 and done["finished"] == [] and Path(done["journal"]).is_file()
    assert set(before) - set(snapshot(photos)) == {Path(p).relative_to(photos) for p in gone}
    assert moves.undo(done["journal"])["restored"] == 3 and snapshot(photos) == before
    with pytest.raises(InstretError, match="inside the indexed folder"):
        find_duplicates(ix, threshold=0.9999, move_to=photos / "dups")
    assert not (photos / "dups").exists()


def instret_process(*args):
    # stdout lists the groups' names as their raw bytes, which need not be UTF-8
    done = subprocess.run([sys.executable, "-m", "instret", *args], capture_output=True)
    done.stderr = done.stderr.decode(errors="replace")
    return done


def test_a_kill_mid_move_then_undo_or_rerun_loses_nothing(odd_collection, tmp_path):
    photos, ix = odd_collection
    before = snapshot(photos)
    dest = tmp_path / "moved"
    args = ["dups", str(ix), "--threshold", "0.9999", "--move-to", str(dest)]
    # the 1st rename writes the journal; kill after the 2nd move's link: that file is in both places
    env = {**os.environ, "INSTRET_KILL_AT": "*:3:after"}
    killed = subprocess.run([sys.executable, str(FAULTY), *args], env=env, capture_output=True)
    assert killed.returncode == -9  # the kill landed mid-move
    journal = next(dest.glob("instret-dups-*.json"))
    copies = [p for p in dest.rglob("*.jpg")]
    assert len(copies) == 2 and len(snapshot(photos)) == len(before) - 1  # 1 moved, 1 in both places
    # undo puts everything back
    done = instret_process("dups", "--undo", str(journal))
    assert done.returncode == 0, done.stderr
    assert snapshot(photos) == before and not list(dest.rglob("*.jpg"))
    # killed again, and this time a rerun of the same command finishes the move
    killed = subprocess.run([sys.executable, str(FAULTY), *args], env=env, capture_output=True)
    assert killed.returncode == -9
    rerun = instret_process(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "finished the interrupted move" in rerun.stderr
    assert len(snapshot(photos)) == len(before) - 3 and len(list(dest.rglob("*.jpg"))) == 3


def test_moving_into_the_indexed_folder_is_refused(collection, capsys):
    photos, ix = collection
    code, _, err = run_cli(["dups", str(ix), "--threshold", "0.9999", "--move-to", str(photos / "dups")], capsys)
    assert code == 1 and "inside the indexed folder" in err and not (photos / "dups").exists()


def test_link_to_makes_review_links_and_touches_nothing(collection, tmp_path, capsys):
    photos, ix = collection
    before = snapshot(photos)
    code, _, err = run_cli(["dups", str(ix), "--threshold", "0.9999", "--link-to", str(tmp_path / "review")], capsys)
    assert code == 0, err
    links = sorted((tmp_path / "review" / "group-0001").iterdir())
    assert [p.name.split("--")[0] for p in links] == ["01", "keep"] and all(p.is_symlink() for p in links)
    assert {p.read_bytes() for p in links} == {(photos / "a" / "002.jpg").read_bytes()}
    assert snapshot(photos) == before


def test_undo_of_a_file_that_is_not_a_journal_is_one_line(tmp_path, capsys):
    (tmp_path / "j.json").write_text("{}")
    code, _, err = run_cli(["dups", "--undo", str(tmp_path / "j.json")], capsys)
    assert code == 1 and "not an instret dups journal" in err and len(err.strip().splitlines()) == 1
