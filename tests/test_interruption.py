"""Interruption: real `instret train` and `instret index` processes killed (SIGKILL, SIGINT), cut
off by a full disk, or killed on either side of an atomic rename; then resumed. Each trial checks
that what was finished before stayed valid and loadable, and that the rerun finishes the work
without redoing finished epochs or encoded batches and without duplicate epochs or index rows.
Also: a reader querying while a writer updates the same index sees whole generations only."""

import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from instret.index import SearchIndex, writer_lock
from instret.indexer import build_index
from instret.trainer import load_checkpoint
from tests.conftest import make_image_folder, make_photos
from tests.test_index import vectors_by_path
from tests.test_train import _assert_same_run

FAULTY = Path(__file__).with_name("faulty_instret.py")


def spawn(args, kill_at: str | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # OMP_NUM_THREADS: conftest.suite_threads
    cmd = [sys.executable, "-m", "instret", *map(str, args)]
    if kill_at:
        env["INSTRET_KILL_AT"] = kill_at
        cmd = [sys.executable, str(FAULTY), *map(str, args)]
    # Ctrl-C as a user's terminal delivers it: a suite started in the background (`cmd &`) hands
    # its children SIGINT ignored, and the SIGINT trials would then strike nothing.
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_until(proc, ready, timeout=240) -> bool:
    """Poll until ready() or the process ends; True if ready while it still ran."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.005)
    return False


def full_disk(proc, size=100_000):
    # From now on the process cannot write a file past `size` bytes: EFBIG, as a full disk gives ENOSPC.
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (size, size))


def one_line_error(proc, needle) -> None:
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    assert err and err[-1].startswith("instret: error:") and needle in err[-1], err[-3:]
    assert not any("Traceback" in line for line in err)


# --- train -----------------------------------------------------------------------------

TRAIN_ARGS = ["--epochs", "5", "--image-size", "24", "--batch-size", "8", "--knn-k", "5", "--workers", "0"]


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_faults")
    folder = make_image_folder(base / "img", per_class=40, size=24)
    ref = spawn(["train", "--data", folder, "--out", base / "ref", *TRAIN_ARGS])
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()
    return folder, base / "ref"


def epochs_done(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


TRAIN_FAULTS = [
    "sigkill-after-epoch-1",
    "sigkill-after-epoch-3",
    "sigkill-random",
    "rename-checkpoint.pt:2:before",
    "rename-checkpoint.pt:2:after",
    "rename-metrics.jsonl:3:before",
    "sigint-random",
    "full-disk-after-epoch-2",
]


@pytest.mark.parametrize("fault", TRAIN_FAULTS)
def test_train_fault_then_resume_equals_uninterrupted(train_reference, tmp_path, fault):
    folder, ref = train_reference
    out = tmp_path / "run"
    args = ["train", "--data", folder, "--out", out, *TRAIN_ARGS]
    if fault.startswith("rename-"):
        proc = spawn(args, kill_at=fault[len("rename-") :])
        assert proc.wait(timeout=300) == -signal.SIGKILL
    else:
        proc = spawn(args)
        if fault.startswith("sigkill-after"):
            assert wait_until(proc, lambda: epochs_done(out) >= int(fault[-1])), "the run ended before the kill"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
        elif fault.endswith("-random"):  # at a random point of epoch 3, timed by epoch 2 on this machine
            assert wait_until(proc, lambda: epochs_done(out) >= 1)
            second_began = time.time()
            assert wait_until(proc, lambda: epochs_done(out) >= 2)
            time.sleep(random.Random(fault).uniform(0.0, 0.8) * (time.time() - second_began))
            assert proc.poll() is None, "the run ended before the fault could strike"
            proc.send_signal(signal.SIGKILL if fault.startswith("sigkill") else signal.SIGINT)
            code = proc.wait(timeout=120)
            if fault.startswith("sigkill"):
                assert code == -signal.SIGKILL
            else:
                assert code == 130
                one_line_error(proc, "train interrupted; the last finished epoch is saved")
        else:
            assert wait_until(proc, lambda: epochs_done(out) >= 2), "the run ended before the disk filled"
            full_disk(proc)
            assert proc.wait(timeout=120) == 1
            one_line_error(proc, "File too large")
            assert not list(out.glob(".*.tmp")), "a failed write left its temporary file"
    ckpt = load_checkpoint(out / "checkpoint.pt")  # the previous checkpoint is whole
    assert [r["epoch"] for r in ckpt["history"]] == list(range(1, ckpt["epoch"] + 1))
    resumed = spawn(["train", "--out", out, "--resume", "--workers", "0"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    _assert_same_run(ref, out)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5]
    assert not list(out.glob(".*.tmp"))


# --- index -----------------------------------------------------------------------------

PHOTOS = 120


@pytest.fixture(scope="module")
def index_setup(trained_run, tmp_path_factory):
    """A folder of 120 photos, the vectors of a clean build, and an index of its first 40 only."""
    base = tmp_path_factory.mktemp("index_faults")
    photos = make_photos(base / "photos", per_group=PHOTOS // 3, size=40, seed=3)
    clean = build_index(photos, trained_run, base / "clean", batch_size=4, workers=0, device="cpu")
    assert clean["vectors"] == PHOTOS
    shutil.copytree(photos / "a", base / "part" / "a")  # copy2: same sizes and mtimes
    build_index(base / "part", trained_run, base / "ix_part", batch_size=4, workers=0, device="cpu")
    return photos, vectors_by_path(base / "clean"), base / "ix_part"


def staged_rows(out: Path) -> int:
    path = out / "staging.sqlite"
    if not path.exists():
        return 0
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT count(*) FROM staged").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        con.close()


INDEX_FAULTS = [
    ("sigkill-random", None, 0),
    ("sigkill-random", None, 1),
    ("sigkill-random", "part", 2),
    ("sigkill-random", "part", 3),
    ("sigint-random", "part", 4),
    ("rename-CURRENT:1:before", None, 0),
    ("rename-CURRENT:1:after", "part", 0),
    ("rename-manifest.json:1:before", "part", 0),
    ("full-disk", None, 0),
    ("full-disk", "part", 0),
]


@pytest.mark.parametrize("fault,start,seed", INDEX_FAULTS)
def test_index_fault_then_rerun_finishes_without_re_encoding(index_setup, trained_run, tmp_path, fault, start, seed):
    photos, clean, ix_part = index_setup
    out = tmp_path / "ix"
    before = 0
    if start == "part":
        shutil.copytree(ix_part, out)
        before = PHOTOS // 3
    args = ["index", photos, "--model", trained_run, "--out", out, "--batch-size", "2", "--workers", "0"]
    if fault.startswith("rename-"):
        proc = spawn(args, kill_at=fault[len("rename-") :])
        assert proc.wait(timeout=300) == -signal.SIGKILL
    else:
        proc = spawn(args)
        target = random.Random(seed).randint(1, PHOTOS - before - 2)  # staged rows when the fault strikes
        assert wait_until(proc, lambda: staged_rows(out) >= target), "the build ended before the fault could strike"
        if fault == "full-disk":
            full_disk(proc, 2_000)
            assert proc.wait(timeout=120) == 1
            one_line_error(proc, "")
        else:
            proc.send_signal(signal.SIGKILL if fault == "sigkill-random" else signal.SIGINT)
            code = proc.wait(timeout=120)
            if fault == "sigkill-random":
                assert code == -signal.SIGKILL
            else:
                assert code == 130
                one_line_error(proc, "index interrupted; every batch encoded so far is staged")
    # What a reader finds now: the old index or the new one, whole.
    committed = 0
    if (out / "CURRENT").exists():
        index = SearchIndex(out)
        committed = index.ntotal
        assert committed in (before, PHOTOS)
        assert len(index.files()) == index.faiss_index().ntotal == committed
    else:
        assert before == 0
    staged = staged_rows(out)
    summary = build_index(photos, trained_run, out, batch_size=2, workers=0, device="cpu")
    if committed == PHOTOS:
        assert (summary["encoded"], summary["unchanged"]) == (0, PHOTOS)
    else:
        assert summary["unchanged"] == before and summary["resumed"] == staged
        assert summary["encoded"] == PHOTOS - before - staged  # nothing staged is encoded again
    got = vectors_by_path(out)
    assert sorted(got) == sorted(clean)
    ids = [i for i, _ in got.values()]
    assert len(set(ids)) == len(ids) == PHOTOS
    for path, (i, v) in got.items():
        assert i == clean[path][0] and np.allclose(v, clean[path][1], atol=1e-5), path
    assert not (out / "staging.sqlite").exists() and not list(out.glob(".*.tmp"))
    assert len(list(out.glob("gen-*"))) <= 2


# --- concurrency -------------------------------------------------------------------------

WRITER = """
import shutil, sys
from pathlib import Path
from instret.indexer import build_index
photos, extra, model, out = map(Path, sys.argv[1:5])
for i in range(8):
    if i % 2:
        shutil.copytree(extra, photos / "x")
    else:
        shutil.rmtree(photos / "x", ignore_errors=True)
    build_index(photos, model, out, batch_size=8, workers=0, device="cpu")
"""


def test_readers_see_whole_generations_while_a_writer_updates(trained_run, tmp_path):
    photos = shutil.copytree(trained_run.parent / "photos", tmp_path / "photos")
    extra = make_photos(tmp_path / "extra", groups=("x",), per_group=10, seed=9) / "x"
    out = tmp_path / "ix"
    build_index(photos, trained_run, out, workers=0, device="cpu")
    small = {p for _, p, *_ in SearchIndex(out).files()}
    big = small | {f"x/{p.name}" for p in extra.iterdir()}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, photos, extra, trained_run, out], stderr=subprocess.PIPE)
    seen = {len(small): 0, len(big): 0}
    rng = random.Random(0)
    while writer.poll() is None or sum(seen.values()) == 0:
        index = SearchIndex(out)
        paths = {p for _, p, *_ in index.files()}
        vectors, ids = index.vectors()
        assert paths in (small, big)  # never a mix of two generations
        assert index.ntotal == len(paths) == len(ids) == len(vectors) == index.faiss_index().ntotal
        row = rng.randrange(len(ids))
        hit = index.search(np.asarray(vectors[row : row + 1]), 1)[0][0]
        assert hit.id == ids[row]  # the FAISS index and the vectors belong together
        seen[len(paths)] += 1
        index.close()
    assert writer.wait() == 0, writer.stderr.read().decode()
    assert seen[len(small)] > 0 and sum(seen.values()) >= 8, seen


def test_a_second_writer_is_refused_with_a_clear_message(trained_run, tmp_path):
    out = tmp_path / "ix"
    build_index(trained_run.parent / "photos", trained_run, out, workers=0, device="cpu")
    with writer_lock(out):  # another process is writing
        second = spawn(["index", trained_run.parent / "photos", "--model", trained_run, "--out", out])
        assert second.wait(timeout=120) == 1
    one_line_error(second, "another `instret index` is updating this index")
    assert SearchIndex(out).ntotal == 30


def test_full_disk_while_writing_a_generation_keeps_the_old_index_and_the_staged_vectors(
    index_setup, trained_run, tmp_path, monkeypatch
):
    import errno

    from instret import index as index_module
    from instret.errors import InstretError

    photos, clean, ix_part = index_setup
    out = shutil.copytree(ix_part, tmp_path / "ix")
    live = (out / "CURRENT").read_text()
    real_save = np.save

    def no_space(path, *args, **kwargs):
        if Path(path).name == "ids.npy":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(index_module.np, "save", no_space)
    with pytest.raises(InstretError, match=r"cannot write the new index \(No space left on device\)"):
        build_index(photos, trained_run, out, batch_size=8, workers=0, device="cpu")
    assert (out / "CURRENT").read_text() == live and SearchIndex(out).ntotal == PHOTOS // 3
    assert sorted(p.name for p in out.glob("gen-*")) == [live.strip()]  # the half-written one is gone
    monkeypatch.setattr(index_module.np, "save", real_save)
    summary = build_index(photos, trained_run, out, batch_size=8, workers=0, device="cpu")
    assert (summary["resumed"], summary["encoded"], summary["vectors"]) == (PHOTOS - PHOTOS // 3, 0, PHOTOS)
