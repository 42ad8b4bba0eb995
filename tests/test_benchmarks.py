"""The benchmark scripts run (a few steps, on tiny data); their figures are not asserted here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_gpu_cifar10_script_runs_a_few_steps_on_cpu(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "c.npz",
        train_x=rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8),
        train_y=rng.integers(0, 10, 300),
        test_x=rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
        test_y=rng.integers(0, 10, 50),
    )
    proc = subprocess.run(
        [
            sys.executable,
            BENCH / "gpu_cifar10.py",
            "--npz",
            tmp_path / "c.npz",
            *"--arch small --device cpu --max-steps 2 --out".split(),
            tmp_path / "run",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json_line(proc.stdout)
    assert {"device", "images_per_s", "seconds_per_epoch", "epochs", "knn_top1", "projected_200_epoch_minutes"} <= set(
        result
    )
    assert result["images_per_s"] > 0 and result["device"] == "cpu"


@pytest.mark.slow
def test_scripts_without_data_exit_with_a_clear_message(tmp_path):
    procs = {}
    for script, args in (
        ("train_throughput.py", ["--data", str(tmp_path / "none")]),
        ("fidelity.py", ["--data", str(tmp_path / "none")]),
        ("retrieval_quality.py", ["--shared", str(tmp_path / "none")]),
        ("dups.py", ["--shared", str(tmp_path / "none")]),
        ("search.py", ["--model", "x", "--cifar", str(tmp_path / "none")]),
        ("serve.py", ["--cifar", str(tmp_path / "none")]),
        ("index_pipeline.py", ["--model", "x", "--data", str(tmp_path / "none")]),
    ):
        # All at once: each spends its time importing torch, on one core.
        procs[script] = subprocess.Popen(
            [sys.executable, BENCH / script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    for script, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "not found" in stderr and "Traceback" not in stderr, script


@pytest.mark.slow
def test_embedded_default_script_times_both_monitor_samples_with_the_same_training():
    proc = subprocess.run(
        [sys.executable, BENCH / "embedded_default.py", "--rounds", "1", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json_line(proc.stdout)
    assert set(result["runs"]) == {"fixed 512", "an eighth"} and result["same_knn"] and result["speedup"] > 0
    fixed, eighth = result["runs"]["fixed 512"][0], result["runs"]["an eighth"][0]
    assert 0 < eighth["monitor_s"] < fixed["monitor_s"]  # 179 images against 512, the same steps


def test_knn_monitor_script_small(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            BENCH / "knn_monitor.py",
            *"--bank 3000 --queries 500 --k 50 --repeats 1 --epoch-steps 2".split(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json_line(proc.stdout)
    assert result["agreement"] > 0.999 and result["speedup"] > 0


@pytest.mark.skipif(
    not (SHARED / "imagenette2" / "val").is_dir(), reason="needs ../shared/datasets (Imagenette, CIFAR-10)"
)
@pytest.mark.slow
def test_retrieval_quality_script_scores_every_method_on_a_small_collection():
    proc = subprocess.run(
        [
            sys.executable,
            BENCH / "retrieval_quality.py",
            *"--parts copy --originals 20 --copies 1 --distractors 20 --minutes 0.1".split(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json_line(proc.stdout)
    for method in ("pixels", "colour_hist", "phash", "untrained", "instret"):
        for variant in (method, method + "+pp"):
            assert 0 < result[variant]["copy"]["mAP"] <= 1 and 0 <= result[variant]["category"]["mAP"] <= 1
    assert result["setup"] == {"originals": 20, "distractors": 20, "queries": 20, "seed": 0}


@pytest.mark.skipif(not (SHARED / "eth80").is_dir(), reason="needs ../shared/datasets/eth80")
@pytest.mark.slow
def test_retrieval_quality_scores_every_method_on_views_of_the_same_objects():
    proc = subprocess.run(
        [sys.executable, BENCH / "retrieval_quality.py", *"--parts multiview --views 3 --minutes 0.05".split()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = last_json_line(proc.stdout)["multiview"]
    trained = ["instret, multi-view off, neighbourhoods off", "instret, neighbourhoods off", "instret (defaults)"]
    alone = {t for t in trained if rows[t]["multi_view"] == "on"}  # trained for views: colour joins the features
    baselines = {"pixels", "colour_hist", "colour_signature", "untrained"}
    assert set(rows) == {*baselines, *trained, *(f"{t}, features alone" for t in alone)}
    for row in rows.values():
        assert 0 < row["mAP"] <= 1 and 0 <= row["precision@10"] <= 1 and 0 < row["category_mAP"] <= 1
    assert [rows[t]["neighbourhoods"] for t in trained] == ["off", "off", "mutual"]
    assert rows[trained[0]]["multi_view"] == "off"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "imagenette2" / "val").is_dir(), reason="needs ../shared/datasets (Imagenette)")
def test_dups_script_scores_instret_and_the_perceptual_hash_on_planted_copies():
    proc = subprocess.run(
        [sys.executable, BENCH / "dups.py", "--photos", "40", "--planted", "10", "--minutes", "0.1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json_line(proc.stdout)["results"]
    assert {"instret", "instret --whiten", "phash, d <= 10"} <= set(result)
    for row in result.values():
        if isinstance(row, dict):
            assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
            assert row["recall_by_edit"]["byte copy"] == 1.0  # two of the ten plants are byte copies: never missed


def test_dups_scale_script_reports_time_and_memory():
    proc = subprocess.run(
        [sys.executable, BENCH / "dups_scale.py", "--sizes", "3000"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    row = last_json_line(proc.stdout)["results"][0]
    assert row["vectors"] == 3000 and row["peak_rss_mb"] >= row["imports_mb"] > 0 and row["planted_found"] > 0.9


@pytest.mark.slow
def test_merge_on_disk_script_compares_both_merges_on_the_same_shards():
    proc = subprocess.run(
        [sys.executable, BENCH / "merge_on_disk.py", *"--rows 6000 --shards 3 --layout IVF16,Flat".split()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json_line(proc.stdout)
    assert result["same_top10"] > 0.9 and result["on-disk"]["recall@10"] == result["in-memory"]["recall@10"]
    assert result["on-disk"]["peak_anon_mb"] > 0 and result["added_memory_ratio"] > 0


def test_serve_script_measures_uploads_to_a_real_server(tmp_path):
    from tests.conftest import make_photos

    cifar, photos = make_photos(tmp_path / "c", per_group=4, size=32), make_photos(tmp_path / "p", per_group=4)
    proc = subprocess.run(
        [
            sys.executable,
            BENCH / "serve.py",
            "--cifar",
            cifar,
            "--imagenette",
            photos,
            "--requests",
            "6",
            "--repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stderr
    results = last_json_line(proc.stdout)["results"]
    for name in ("cifar10", "imagenette"):
        row = results[name]
        assert row["images"] == 12 and row["one_client"]["p50_ms"] > 0 and row["8_clients"]["requests_per_s"] > 0
        assert row["cold_query_s"] > 0 and row["in_process"]["p50_ms"] > 0
    assert set(results["startup_s"]) == {"instret --help", "instret info", "instret env", "import torch"}


def test_index_pipeline_script_compares_settings_with_the_encoder_alone(trained_run):
    proc = subprocess.run(
        [sys.executable, BENCH / "index_pipeline.py", "--model", trained_run, "--data", trained_run.parent / "photos",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (row,) = last_json_line(proc.stdout)["results"].values()
    assert row["images"] == 30 and row["encoder_alone_images_per_s"] > 0
    settings = {(s["workers"], s["encoder_threads"], s["batch"], s["decoding"]) for s in row["settings"]}
    assert settings >= {(2, 2, 256, "index"), (2, 1, 64, "index"), (2, 0, 64, "index"), (2, 1, 64, "libjpeg only")}
    assert all(s["efficiency"] > 0 for s in row["settings"])


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_on_the_cpu(tmp_path):
    proc = subprocess.run(
        ["bash", BENCH / "gpu_check.sh", "--cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"env.json", "device-tests.txt", "gpu_cifar10.json", "knn_monitor.json", "index_query.json"}
    assert json.loads((tmp_path / "env.json").read_text())["device"] == "cpu"
    assert json.loads((tmp_path / "knn_monitor.json").read_text())["agreement"] > 0.999
    check = json.loads((tmp_path / "index_query.json").read_text())
    assert check["query_finds_itself"] and check["max_cosine_gap"] < 1e-4
    assert "passed" in (tmp_path / "device-tests.txt").read_text()
