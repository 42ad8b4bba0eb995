"""Untrusted files run no code: torch files load with weights_only, YAML as plain data, NumPy
without pickle; a booby-trapped checkpoint or encoder is refused and its payload never runs."""

import ast
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
MARKER = "instret_security_test_marker"


class Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize(
    "name,args",
    [
        ("checkpoint.pt", lambda run, tmp: ["train", "--resume", "--out", str(run), "--workers", "0"]),
        (
            "encoder.pt",
            lambda run, tmp: ["index", str(run.parent / "photos"), "--model", str(run), "--out", str(tmp / "ix")],
        ),
    ],
)
def test_a_booby_trapped_torch_file_is_refused_and_runs_nothing(trained_run, tmp_path, capsys, name, args):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("index"))
    shutil.copytree(trained_run.parent / "photos", tmp_path / "photos")
    target = tmp_path / MARKER
    blob = torch.load(run / name, weights_only=True)
    blob["extra"] = Payload(str(target))
    torch.save(blob, run / name)
    code, _, err = run_cli(args(run, tmp_path), capsys)
    assert code == 1 and err.count("\n") == 1 and f"not a readable {name[:-3]}" in err, err
    assert not target.exists(), "the payload ran"


def test_yaml_config_with_a_python_tag_is_refused(tmp_path, capsys):
    target = tmp_path / MARKER
    (tmp_path / "c.yaml").write_text(f"epochs: !!python/object/apply:os.system ['touch {target}']\n")
    code, _, err = run_cli(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")], capsys)
    assert code == 1 and "cannot parse config file" in err
    assert not target.exists() and not (tmp_path / "run").exists()


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), {k.arg: ast.unparse(k.value) for k in node.keywords}


def test_no_loader_in_the_code_can_run_code():
    """Every deserialising call in instret/ and cli/ is of the safe kind (a guard for later edits)."""
    sources = [p for d in ("instret", "cli") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 10
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "marshal", "shelve") for n in names), path
        for func, kwargs in _calls(tree):
            if func == "torch.load":
                assert kwargs.get("weights_only") == "True", path
            if func in ("np.load", "numpy.load"):
                assert kwargs.get("allow_pickle", "False") == "False", path
            assert func not in ("yaml.load", "yaml.unsafe_load", "eval", "exec"), (path, func)
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "", "0")
