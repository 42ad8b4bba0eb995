"""`instret index --ray`: a local Ray build equals the plain build (ids, paths, vectors, skipped
files), also when an encoder actor is killed midway; a killed driver resumes from staging;
an address nothing answers at is refused in one line within seconds."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from instret.index import SearchIndex
from instret.indexer import build_index
from tests.conftest import make_photos

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, trained_run):
    """(photos with one unreadable file, the plain build of them)."""
    base = tmp_path_factory.mktemp("ray")
    photos = make_photos(base / "photos", groups=("a", "b", "c", "d"), per_group=40, seed=3)
    (photos / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    build_index(photos, trained_run, base / "plain", workers=0, device="cpu")
    return photos, base / "plain"


def assert_same_index(a, b) -> None:
    x, y = SearchIndex(a), SearchIndex(b)
    (vx, ix), (vy, iy) = x.vectors(), y.vectors()
    assert np.array_equal(ix, iy)
    assert [e[:5] for e in x.entries()] == [e[:5] for e in y.entries()]  # id, path, size, mtime, sha256
    assert np.abs(np.asarray(vx) - np.asarray(vy)).max() <= 1e-5
    assert x.skipped() == y.skipped() and len(x.skipped()) == 1


def test_a_local_ray_build_equals_the_plain_build(folder, trained_run, tmp_path):
    photos, plain = folder
    summary = build_index(photos, trained_run, tmp_path / "ray", batch_size=16, device="cpu", ray="local")
    assert summary["encoded"] == 160 and summary["skipped"] == 1
    assert_same_index(plain, tmp_path / "ray")


def encoder_actors() -> list:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any("MapBatches(Encode)" in part for part in p.info["cmdline"] or []):
            found.append(p)
    return found


def staged(index_dir) -> int:
    try:
        with sqlite3.connect(index_dir / "staging.sqlite") as con:
            return con.execute("SELECT COUNT(*) FROM staged").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_encoder_actor_is_replaced_and_the_build_still_equals_the_plain_one(
    folder, trained_run, tmp_path, monkeypatch
):
    from instret import indexer

    photos, plain = folder
    killed, commit = [], indexer.stage_batch

    def commit_then_kill_an_encoder(staging, done, rows):
        # Midway, with the driver held here: a batch is committed, the others are not yet.
        commit(staging, done, rows)
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            actors = encoder_actors()
            if actors:
                actors[0].send_signal(signal.SIGKILL)
                killed.append(actors[0].pid)
            time.sleep(0.05)

    monkeypatch.setattr(indexer, "stage_batch", commit_then_kill_an_encoder)
    summary = build_index(photos, trained_run, tmp_path / "ray", batch_size=4, device="cpu", ray="local")
    assert killed, "no encoder actor was seen while the build ran"
    assert summary["encoded"] == 160
    assert_same_index(plain, tmp_path / "ray")


def test_a_killed_driver_resumes_from_staging_without_encoding_it_again(folder, trained_run, tmp_path):
    photos, plain = folder
    out = tmp_path / "ray"
    script = Path(__file__).parent / "killed_after_staging.py"
    command = [sys.executable, str(script), "index", str(photos), "--model", str(trained_run), "--out", str(out)]
    env = {**os.environ, "INSTRET_KILL_AFTER_BATCHES": "3", "PYTHONPATH": str(Path(__file__).parents[1])}
    driver = subprocess.run(
        command + ["--batch-size", "4", "--ray"], env=env, capture_output=True, start_new_session=True
    )
    assert driver.returncode == -signal.SIGKILL
    committed = staged(out)
    assert committed == 3 * 4  # three batches of four
    summary = build_index(photos, trained_run, out, batch_size=16, device="cpu", ray="local")
    assert summary["resumed"] == committed and summary["encoded"] == 160 - committed
    assert_same_index(plain, out)


def test_a_ray_address_nothing_answers_at_is_one_line_within_seconds(folder, trained_run, tmp_path):
    photos, _ = folder
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "instret", "index", str(photos), "--model", str(trained_run), "--out", str(tmp_path)]
        + ["--ray", "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and time.monotonic() - start < 15
    assert done.stderr.strip().splitlines() == [
        "instret: error: --ray 127.0.0.1:9: no Ray head answers there (Connection refused)"
    ]
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_a_running_cluster_is_joined_with_its_token_and_refused_without(folder, trained_run, tmp_path):
    photos, plain = folder
    port = 20000 + os.getpid() % 20000
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    ray_cli = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
        ]
        + ["--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        host = ray.util.get_node_ip_address()
        address = f"{host}:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the head's GCS listening
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)  # and the rest of the head started behind it
        command = [sys.executable, "-m", "instret", "index", str(photos), "--model", str(trained_run)]
        refused = subprocess.run(
            command + ["--out", str(tmp_path / "refused"), "--ray", address],
            env={k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1].startswith(f"instret: error: --ray {address}: the cluster wants")
        joined = subprocess.run(
            command + ["--out", str(tmp_path / "joined"), "--batch-size", "16", "--ray", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert_same_index(plain, tmp_path / "joined")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
