"""CI executes the walkthrough notebook top to bottom (nbclient); a failing cell fails the test.
Its last cell checks the numbers its first cell states. The optional CIFAR-10 part is skipped
here to keep the suite short (it runs when the notebook is run by hand with the data present)."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
# The digits run is shortened from the default's 40 epochs: the checks of the last cell hold at 15
# (kNN top-1 0.9136 on one thread), and the default's own figure is measured by `instret train` (README
# "Numbers"), not in the suite.
DIGITS_EPOCHS = 15
DIGITS_FIGURES = {
    "digits_curves",
    "neighbours_untrained",
    "neighbours_trained",
    "failures_trained",
    "tsne_trained_vs_pixels",
    "augmented_similarities",
}


@pytest.mark.slow
def test_walkthrough_runs_top_to_bottom_and_reproduces_its_numbers(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("INSTRET_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("INSTRET_NOTEBOOK_CIFAR_EPOCHS", "0")
    monkeypatch.setenv("INSTRET_NOTEBOOK_DIGITS_EPOCHS", str(DIGITS_EPOCHS))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook stripped"
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    figures = {p.stem for p in (tmp_path / "out" / "figures").glob("*.png")}
    assert figures == DIGITS_FIGURES
    measured = json.loads((tmp_path / "out" / "measured.json").read_text())
    assert measured["digits_knn_top1"] >= 0.88
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "FAIL" not in last and last.count("ok  ") == 7, last
