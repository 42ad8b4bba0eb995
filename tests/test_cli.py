import json
import subprocess
import sys

import pytest

from instret.cli.main import main


def tiny_train_args(data, out, epochs=1, *extra) -> list[str]:
    """`instret train` on a small folder, quickly: the options most CLI tests share."""
    return ["train", "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            *"--image-size 16 --batch-size 8 --knn-k 5 --workers 0".split(), *extra]  # fmt: skip


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_train_on_synthetic_folder_writes_every_run_file(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(tiny_train_args(image_folder, out, 2), capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "encoder.pt",
        "final.json",
        "index",
        "metrics.jsonl",
    ]
    assert json.loads(stdout) == json.loads((out / "final.json").read_text())
    assert "epoch 2/2" in err and " left" in err and ", 2 epochs," in err
    assert json.loads((out / "config.json").read_text())["dataset"] is None  # a folder, not the digits


def test_nce_with_more_noise_than_images_says_so(image_folder, tmp_path, capsys):
    code, _, err = run_cli(
        tiny_train_args(image_folder, tmp_path / "run", 1, "--loss", "nce", "--nce-k", "100"), capsys
    )
    assert code == 0, err
    assert "note: --nce-k 100 noise samples for 36 images" in err


def test_config_file_sets_defaults_and_flags_override(image_folder, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {image_folder}\nepochs: 3\nimage-size: 16\nbatch-size: 8\nknn-k: 5\nworkers: 0\nlr: 0.5\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", str(cfg), "--epochs", "1", "--out", str(out)], capsys)
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.5 and saved["image_size"] == 16


def test_neighbourhood_and_multi_view_flags_reach_the_saved_configuration(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    flags = "--neighbourhoods anchors --neighbour-k 3 --neighbour-rounds 2 --multi-view on".split()
    code, _, err = run_cli(tiny_train_args(image_folder, out, 1, *flags), capsys)
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["neighbourhoods"], saved["neighbour_k"], saved["neighbour_rounds"], saved["multi_view"]) == (
        "anchors",
        3,
        2,
        "on",
    )
    code, _, err = run_cli(tiny_train_args(image_folder, tmp_path / "r2", 1, "--multi-view", "sometimes"), capsys)
    assert code == 2 and "--multi-view" in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--data", "/no/such/folder"], "no such folder"),
        (["train", "--frobnicate"], "No such option"),
        (["train", "--epochs", "0"], "--epochs must be at least 1"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--device", "cuda:7"], "--device"),
        (["train", "--stream"], "--stream reads a --data folder; the built-in datasets are held in memory"),
    ],
)
def test_bad_input_gives_one_line_error(args, needle, capsys):
    code, out, err = run_cli(args, capsys)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("instret: error:") and needle in err
    assert "Traceback" not in err


def test_empty_folder_gives_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    code, _, err = run_cli(["train", "--data", str(tmp_path / "empty")], capsys)
    assert code == 1 and err.count("\n") == 1 and "no image files" in err


def test_bad_files_among_good_ones_are_skipped_and_listed(image_folder, tmp_path, capsys):
    (image_folder / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, _, err = run_cli(tiny_train_args(image_folder, tmp_path / "r"), capsys)
    assert code == 0 and "skipped 1 unreadable file" in err and "broken.png" in err


def test_console_script_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "instret", "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--nce-k" in proc.stdout and "--resume" in proc.stdout


def test_train_help_states_the_defaults_that_actually_run(capsys):
    import torch

    from instret.config import TrainConfig, with_presets
    from instret.run import resolve

    def resolved(options):
        return resolve(TrainConfig.from_dict(with_presets({"image_size": 32, **options})), torch.device("cpu"))

    digits, folder = resolved({}), resolved({"data": "photos"})
    code, out, _ = run_cli(["train", "--help"], capsys)
    text = " ".join(out.split())
    assert code == 0
    assert f"Epochs [{folder.epochs}; {digits.epochs} for digits]" in text
    assert f"Batch size [{folder.batch_size}; {digits.batch_size} for digits]" in text
    assert f"SGD learning rate [{folder.lr}]" in text and f"[{digits.lr}]" in text


@pytest.mark.parametrize(
    "command, target, says",
    [
        ("train", "instret.run.train", "train interrupted; the last finished epoch is saved"),
        ("index", "instret.indexer.build_index", "index interrupted; every batch encoded so far is staged"),
    ],
)
def test_an_interrupt_names_the_command_it_stopped(image_folder, tmp_path, monkeypatch, capsys, command, target, says):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    args = {
        "train": tiny_train_args(image_folder, tmp_path / "run"),
        "index": ["index", str(image_folder), "--model", str(tmp_path), "--out", str(tmp_path / "ix")],
    }[command]
    if command == "index":  # a model file that passes the path check; the interrupt comes before it is read
        (tmp_path / "encoder.pt").write_bytes(b"")
    code, _, err = run_cli(args, capsys)
    err = err.strip()  # click ends the ^C line first
    assert code == 130 and "\n" not in err and err.startswith(f"instret: error: {says}")
    other = {"train": "index", "index": "train"}[command]
    assert f"{other}:" not in err and f"{other} interrupted" not in err
