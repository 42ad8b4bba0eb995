"""Files deleted after indexing: `query`, `dups` and `serve` mark them ("missing"), say on
stderr how to update the index, and `--existing-only` leaves them out; nothing missing is ever
kept or moved."""

import json
import shlex
import shutil

import pytest

from instret.indexer import build_index
from instret.searcher import query
from tests.test_cli import run_cli


@pytest.fixture
def gone(trained_run, tmp_path):
    """(photos, index, the deleted file, its bytes): a copy of the photos with a byte copy of
    a/000.jpg added, indexed, then that copy deleted."""
    photos = shutil.copytree(trained_run.parent / "photos", tmp_path / "photos")
    copy = photos / "a" / "000-copy.jpg"
    shutil.copy(photos / "a" / "000.jpg", copy)
    build_index(photos, trained_run, tmp_path / "ix", workers=0, device="cpu")
    data = copy.read_bytes()
    copy.unlink()
    return photos, tmp_path / "ix", copy, data


def test_query_marks_the_deleted_file_and_existing_only_drops_it(gone, capsys):
    photos, ix, copy, _ = gone
    original = photos / "a" / "000.jpg"
    code, out, err = run_cli(["query", str(original), "--index", str(ix), "-k", "5", "--json"], capsys)
    assert code == 0, err
    results = json.loads(out)["results"]
    marked = {r["path"]: r["missing"] for r in results}
    assert marked[str(copy)] is True and marked[str(original)] is False
    assert sum(marked.values()) == 1  # every other file is there
    # Text output: the same lines, and one note on stderr with the command that updates the index.
    code, out, err = run_cli(["query", str(original), "--index", str(ix), "-k", "5"], capsys)
    assert code == 0 and str(copy) in out
    note = [line for line in err.splitlines() if line.startswith("note:")]
    assert note == [
        f"note: gone since indexing: 1 of the files shown ({copy}); --existing-only leaves them out; "
        f"update the index: instret index {photos} --model {ix} --out {ix}"
    ]
    # --existing-only: still k results, none of them the deleted file.
    code, out, err = run_cli(["query", str(original), "--index", str(ix), "-k", "5", "--existing-only"], capsys)
    paths = [line.split("\t")[2] for line in out.strip().splitlines()]
    assert code == 0 and len(paths) == 5 and str(copy) not in paths and "note:" not in err
    assert paths[:1] == [str(original)]


def test_existing_only_widens_the_search_until_k_files_are_there(gone):
    photos, ix, copy, _ = gone
    for f in sorted((photos / "b").glob("*.jpg")):  # a whole group gone: the nearest are all missing
        f.unlink()
    everything = query(ix, [photos / "c" / "001.jpg"], k=31)[0]["results"]
    there = [r["path"] for r in everything if not r["missing"]]
    assert len(there) == 20
    found = query(ix, [photos / "c" / "001.jpg"], k=20, existing_only=True)[0]["results"]
    assert [r["path"] for r in found] == there  # the 20 that remain, in the same order
    assert [r["rank"] for r in found] == list(range(1, 21))


def test_the_printed_update_command_runs_and_then_nothing_is_missing(gone, capsys):
    photos, ix, copy, _ = gone
    run_cli(["query", str(photos / "a" / "000.jpg"), "--index", str(ix), "-k", "3"], capsys)
    code, _, err = run_cli(["query", str(photos / "a" / "000.jpg"), "--index", str(ix), "-k", "3"], capsys)
    update = err.split("update the index: ")[1].strip()
    code, _, err = run_cli(shlex.split(update)[1:], capsys)  # as printed, less the program's name
    assert code == 0 and "1 removed" in err, err
    code, out, err = run_cli(["query", str(photos / "a" / "000.jpg"), "--index", str(ix), "-k", "3"], capsys)
    assert code == 0 and str(copy) not in out and "note:" not in err


def test_html_and_grid_strike_out_the_missing_file(gone, tmp_path, capsys):
    photos, ix, copy, _ = gone
    page, grid = tmp_path / "q.html", tmp_path / "q.png"
    args = ["query", str(photos / "a" / "000.jpg"), "--index", str(ix), "-k", "3"]
    code, _, err = run_cli([*args, "--html", str(page), "--grid", str(grid)], capsys)
    assert code == 0, err
    html = page.read_text()
    assert html.count('<figure class="gone"') == 1 and "missing: #" in html and "file missing" in html
    from instret import plots

    fig = plots.query_grid(query(ix, [photos / "a" / "000.jpg"], k=3))
    captions = [ax.get_title() for ax in fig.axes[1:]]
    assert sum("missing" in c for c in captions) == 1
    struck = [ax for ax in fig.axes[1:] if "missing" in ax.get_title()][0]
    assert len(struck.lines) == 2  # the red cross
    plots.pyplot().close(fig)


def test_dups_marks_never_moves_and_existing_only_drops_a_missing_member(gone, tmp_path, capsys):
    photos, ix, copy, _ = gone
    code, out, err = run_cli(["dups", str(ix), "--json"], capsys)
    assert code == 0, err
    group = json.loads(out)["groups"][0]
    members = {m["path"]: m["missing"] for m in group["members"]}
    assert members == {str(photos / "a" / "000.jpg"): False, str(copy): True}
    assert group["keep"] == str(photos / "a" / "000.jpg")  # the missing one is never kept
    assert "note: gone since indexing: 1 of the files shown" in err
    code, out, err = run_cli(["dups", str(ix)], capsys)
    assert f"missing\t1.0000\t0x0\t{copy}" in out.splitlines()
    code, out, err = run_cli(["dups", str(ix), "--move-to", str(tmp_path / "moved")], capsys)
    assert code == 0 and "nothing to move" in err and not (tmp_path / "moved" / "a").exists()
    code, out, err = run_cli(["dups", str(ix), "--existing-only", "--json"], capsys)
    assert code == 0 and json.loads(out)["groups"] == [] and "note:" not in err


def test_the_server_marks_missing_files_and_leaves_them_out_when_asked(gone):
    pytest.importorskip("uvicorn")
    from tests.server_process import Server

    photos, ix, copy, data = gone
    with Server(ix) as server:
        _, found = server.post("/api/v1/search?k=3", data)
        hits = found["queries"][0]["results"]
        assert [h["missing"] for h in hits if h["path"] == str(copy)] == [True]
        _, found = server.post("/api/v1/search?k=3&existing_only=1", data)
        hits = found["queries"][0]["results"]
        assert len(hits) == 3 and not any(h["missing"] or h["path"] == str(copy) for h in hits)
        _, dups = server.get("/api/v1/duplicates")
        assert [m["missing"] for m in dups["groups"][0]["members"]] == [False, True]
        assert server.get("/api/v1/duplicates?existing_only=1")[1]["groups"] == []
        # A file deleted while the server runs is marked from then on (a stat per answer).
        (photos / "a" / "000.jpg").unlink()
        _, dups = server.get("/api/v1/duplicates")
        assert [m["missing"] for m in dups["groups"][0]["members"]] == [True, True]
