"""Bad image files: a reader refuses each with a reason; index and train skip, count and list
them and go on; `query` on one exits non-zero with one line naming the file and the reason."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from instret import images
from instret.images import ImageReadError, list_image_files, open_rgb, read_image
from instret.indexer import build_index
from instret.info import index_info
from tests.badfiles import BAD, ODD, ODD_NAMES, png_header_only
from tests.conftest import make_image_folder
from tests.test_cli import run_cli


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_file_is_refused_with_a_reason(tmp_path, kind):
    write, reason = BAD[kind]
    with pytest.raises(ImageReadError, match=reason):
        read_image(write(tmp_path), 16)


@pytest.mark.parametrize("kind", sorted(ODD))
def test_each_awkward_valid_file_reads_as_the_picture_it_holds(tmp_path, kind):
    write, looks_right = ODD[kind]
    path = write(tmp_path)
    assert looks_right(open_rgb(path)), kind
    assert read_image(path, 16).shape == (3, 16, 16)


def test_pixel_limit_is_on_by_default_and_adjustable(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "wide.png")
    assert read_image(tmp_path / "wide.png", 16).shape == (3, 16, 16)
    with pytest.raises(ImageReadError, match="20000 pixels, over the limit of 19999"):
        read_image(tmp_path / "wide.png", 16, max_pixels=19_999)
    assert read_image(tmp_path / "wide.png", 16, max_pixels=20_000).shape == (3, 16, 16)
    # Over Pillow's own hard refusal (twice its default) when the limit is lifted: instret's
    # limit decides, and the file then fails only for what it really is (a header with no pixels).
    (tmp_path / "huge.png").write_bytes(png_header_only(20_000, 10_000))
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(tmp_path / "huge.png", 16)
    with pytest.raises(ImageReadError) as lifted:
        read_image(tmp_path / "huge.png", 16, max_pixels=0)
    assert "limit" not in str(lifted.value)


def test_file_vanishing_or_unreadable_after_listing(tmp_path, monkeypatch):
    Image.new("RGB", (20, 20)).save(tmp_path / "gone.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "locked.png")
    listed = list_image_files(tmp_path)
    (tmp_path / "gone.png").unlink()
    real_open = os.open

    def refuse_locked(path, *args, **kwargs):  # as a chmod 000 would, even when the tests run as root
        if os.fspath(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images.os, "open", refuse_locked)
    reasons = {}
    for path in listed:
        with pytest.raises(ImageReadError) as e:
            read_image(path, 16)
        reasons[path.name] = str(e.value)
    assert reasons == {"gone.png": "No such file or directory", "locked.png": "Permission denied"}


def test_listing_survives_a_folder_symlink_loop(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "a.png")
    os.symlink("..", tmp_path / "sub" / "up")  # sub/up/sub/up/... forever if followed
    assert [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)] == ["sub/a.png"]


def bad_names(tmp_path) -> dict:
    """{file name: reason} of the BAD files (made once more, in a scratch folder, for their names)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return {write(scratch).name: reason for write, reason in BAD.values()}


@pytest.fixture
def messy_folder(tmp_path):
    """Good images in class folders, plus every bad and awkward file and name in one of them."""
    root = make_image_folder(tmp_path / "messy", per_class=6, size=24)
    for write, _ in BAD.values():
        write(root / "red")
    for write, _ in ODD.values():
        write(root / "green")
    for name in ODD_NAMES:
        shutil.copy(root / "blue" / "000.png", os.path.join(os.fsencode(root / "blue"), name))
    return root


GOOD_IN_MESSY = 3 * 6 + len(ODD) + len(ODD_NAMES)


def test_index_skips_counts_and_lists_every_bad_file_and_keeps_the_rest(messy_folder, trained_run, tmp_path, capsys):
    code, out, err = run_cli(
        [
            "index",
            str(messy_folder),
            "--model",
            str(trained_run),
            "--out",
            str(tmp_path / "ix"),
            *"--workers 2 --device cpu".split(),
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["vectors"] == GOOD_IN_MESSY and summary["skipped"] == len(BAD)
    assert f"skipped {len(BAD)} unreadable file(s)" in err
    listed = {f["path"]: f["reason"] for f in index_info(tmp_path / "ix")["skipped_files"]}
    expected = bad_names(tmp_path)
    assert sorted(listed) == sorted(f"red/{name}" for name in expected)
    for path, reason in listed.items():
        assert expected[path[4:]] in reason, (path, reason)
    # Every awkward name is searchable and comes back exactly (JSON keeps the bytes).
    for name in ODD_NAMES:
        path = os.fsdecode(os.path.join(os.fsencode(messy_folder / "blue"), name))
        code, out, err = run_cli(["query", path, "--index", str(tmp_path / "ix"), "-k", "8", "--json"], capsys)
        assert code == 0, err
        assert path in {r["path"] for r in json.loads(out)["results"]}
    # Text output: one hit per line, a newline in a name shown as \\n.
    path = os.fsdecode(os.path.join(os.fsencode(messy_folder / "blue"), b"new\nline.png"))
    done = subprocess.run(
        [sys.executable, "-m", "instret", "query", path, "--index", str(tmp_path / "ix"), "-k", "8"],
        capture_output=True,
    )
    lines = os.fsdecode(done.stdout).strip().split("\n")
    assert done.returncode == 0 and len(lines) == 8 and all(line.count("\t") == 2 for line in lines)
    assert any(line.endswith("blue/new\\nline.png") for line in lines), lines


def test_train_skips_counts_and_lists_every_bad_file(messy_folder, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(
        [
            "train",
            "--data",
            str(messy_folder),
            "--out",
            str(run),
            *"--epochs 1 --image-size 16 --batch-size 8 --knn-k 3 --workers 2".split(),
        ],
        capsys,
    )
    assert code == 0, err
    assert f"skipped {len(BAD)} unreadable file(s)" in err
    for name, reason in bad_names(tmp_path).items():
        assert any(name in line and reason in line for line in err.splitlines()), name
    assert index_info(run / "index")["vectors"] == GOOD_IN_MESSY


@pytest.fixture(scope="module")
def photo_index(trained_run, tmp_path_factory):
    ix = tmp_path_factory.mktemp("photo_index") / "ix"
    build_index(trained_run.parent / "photos", trained_run, ix, workers=0, device="cpu")
    return ix


@pytest.mark.parametrize("kind", sorted(BAD))
def test_query_on_a_bad_image_is_one_line_naming_file_and_reason(photo_index, tmp_path, capsys, kind):
    write, reason = BAD[kind]
    path = write(tmp_path)
    code, out, err = run_cli(["query", str(path), "--index", str(photo_index)], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and str(path) in err and reason in err, err


def test_folders_with_no_images_are_one_line_errors(tmp_path, trained_run, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    for args in (
        ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run")],
        ["index", str(tmp_path / "empty"), "--model", str(trained_run), "--out", str(tmp_path / "ix")],
    ):
        code, out, err = run_cli(args, capsys)
        assert code == 1 and err.count("\n") == 1 and "no image files" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "ix" / "CURRENT").exists()
