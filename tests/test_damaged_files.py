"""Damaged or wrong files and options: one line on stderr, a non-zero exit, no traceback, and
nothing on disk changes (every file under the test folder has the same bytes afterwards)."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from instret.indexer import build_index
from tests.test_cli import run_cli


def snapshot(root: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def scribble(path: Path) -> None:
    """Same length, different bytes: what a bad disk block or a stray write leaves."""
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 7):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def newer_manifest(path: Path) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))


@pytest.fixture(scope="module")
def built(trained_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("damage")
    build_index(trained_run.parent / "photos", trained_run, base / "ix", workers=0, device="cpu")
    return base / "ix"


def live(ix: Path) -> Path:
    return ix / (ix / "CURRENT").read_text().strip()


# (what is damaged, how, the word the one-line error must hold)
INDEX_DAMAGE = [
    ("index.faiss", truncate, "FAISS index unreadable"),
    ("index.faiss", scribble, "FAISS index unreadable"),
    ("meta.sqlite", truncate, "metadata unreadable"),
    ("meta.sqlite", scribble, "metadata unreadable"),
    ("manifest.json", truncate, "not valid JSON"),
    ("manifest.json", newer_manifest, "newer than this instret reads"),
    ("encoder.pt", truncate, "not a readable encoder file"),
    ("encoder.pt", scribble, "not a readable encoder file"),
]


def table_ids(table) -> list[str]:
    return [f"{name}-{damage.__name__}" for name, damage, _ in table]


@pytest.mark.parametrize("name,damage,needle", INDEX_DAMAGE, ids=table_ids(INDEX_DAMAGE))
def test_query_on_a_damaged_index(built, trained_run, tmp_path, capsys, name, damage, needle):
    ix = shutil.copytree(built, tmp_path / "ix")
    damage(live(ix) / name)
    before = snapshot(tmp_path)
    code, out, err = run_cli(
        ["query", str(trained_run.parent / "photos" / "a" / "001.jpg"), "--index", str(ix)], capsys
    )
    assert code == 1 and out == "" and err.count("\n") == 1 and needle in err, err
    assert snapshot(tmp_path) == before


def test_update_of_an_index_with_damaged_vectors_refuses_and_rebuild_repairs(built, trained_run, tmp_path, capsys):
    ix = shutil.copytree(built, tmp_path / "ix")
    truncate(live(ix) / "vectors.npy")
    before = snapshot(tmp_path)
    args = [
        "index",
        str(trained_run.parent / "photos"),
        "--model",
        str(trained_run),
        "--out",
        str(ix),
        "--workers",
        "0",
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 1 and err.count("\n") == 1 and "vectors unreadable" in err, err
    assert snapshot(tmp_path) == before
    code, out, err = run_cli(args + ["--rebuild"], capsys)
    assert code == 0 and json.loads(out)["vectors"] == 30, err


@pytest.mark.parametrize("current", ["gen-999999\n", "../../etc\n", "\x00\x01garbage"])
def test_current_naming_no_generation(built, trained_run, tmp_path, capsys, current):
    ix = shutil.copytree(built, tmp_path / "ix")
    (ix / "CURRENT").write_text(current)
    before = snapshot(tmp_path)
    code, out, err = run_cli(["info", str(ix)], capsys)
    assert code == 1 and err.count("\n") == 1 and "damaged" in err, err
    assert snapshot(tmp_path) == before


def test_folders_that_are_not_indexes(trained_run, tmp_path, capsys):
    photos = shutil.copytree(trained_run.parent / "photos", tmp_path / "photos")
    before = snapshot(tmp_path)
    code, _, err = run_cli(["query", str(photos / "a" / "001.jpg"), "--index", str(photos)], capsys)
    assert code == 1 and err.count("\n") == 1 and "not an instret index" in err, err
    # Writing an index into a folder of other files would mix them: refused.
    code, _, err = run_cli(["index", str(photos), "--model", str(trained_run), "--out", str(photos / "a")], capsys)
    assert code == 1 and err.count("\n") == 1 and "neither empty nor an instret index" in err, err
    (tmp_path / "file").write_text("x")
    before["file"] = snapshot(tmp_path)["file"]
    code, _, err = run_cli(["index", str(photos), "--model", str(trained_run), "--out", str(tmp_path / "file")], capsys)
    assert code == 1 and err.count("\n") == 1 and "not a folder" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("k", ["0", "-3", "many"])
def test_k_must_be_a_positive_number(built, trained_run, capsys, k):
    code, out, err = run_cli(
        ["query", str(trained_run.parent / "photos" / "a" / "001.jpg"), "--index", str(built), "-k", k], capsys
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and "-k" in err, err


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A finished run folder (config.json, checkpoint.pt, metrics.jsonl, encoder.pt, final.json)."""
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("index"))
    return run


def bump_version(path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    else:
        blob = torch.load(path, weights_only=True)
        blob["format_version"] = 99
        torch.save(blob, path)


RUN_DAMAGE = [
    ("checkpoint.pt", truncate, "not a readable checkpoint file"),
    ("checkpoint.pt", scribble, "not a readable checkpoint file"),
    ("checkpoint.pt", bump_version, "newer than this instret reads"),
    ("config.json", truncate, "cannot read"),
    ("config.json", bump_version, "format version 99"),
]


@pytest.mark.parametrize("name,damage,needle", RUN_DAMAGE, ids=table_ids(RUN_DAMAGE))
def test_resume_of_a_damaged_or_newer_run(run_copy, tmp_path, capsys, name, damage, needle):
    damage(run_copy / name)
    before = snapshot(tmp_path)
    code, out, err = run_cli(["train", "--resume", "--out", str(run_copy), "--epochs", "40", "--workers", "0"], capsys)
    assert code == 1 and err.count("\n") == 1 and needle in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "damage,needle", [(truncate, "not a readable encoder file"), (bump_version, "newer than this instret reads")]
)
def test_damaged_or_newer_encoder_given_to_index(run_copy, trained_run, tmp_path, capsys, damage, needle):
    damage(run_copy / "encoder.pt")
    before = snapshot(tmp_path)
    code, _, err = run_cli(
        ["index", str(trained_run.parent / "photos"), "--model", str(run_copy), "--out", str(tmp_path / "ix")], capsys
    )
    assert code == 1 and err.count("\n") == 1 and needle in err, err
    assert snapshot(tmp_path) == before and not (tmp_path / "ix").exists()
