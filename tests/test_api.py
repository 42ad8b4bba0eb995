"""The library as the README shows it: every public name, called twice in one process."""

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import instret
from tests.conftest import make_image_folder

TINY = {"epochs": 1, "image_size": 16, "batch_size": 8, "knn_k": 3, "workers": 0, "monitor_size": 8}


def test_train_stays_callable_after_its_module_is_imported(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", classes=("a",), per_class=10)
    first = instret.train({"data": str(folder), "out": str(tmp_path / "r1"), **TINY})
    for module in ("instret.run", "instret.trainer"):  # importing a module once replaced instret.train with it
        importlib.import_module(module)

    second = instret.train({"data": str(folder), "out": str(tmp_path / "r2"), **TINY})
    assert callable(instret.train) and first["epochs"] == second["epochs"] == 1
    assert (tmp_path / "r1" / "encoder.pt").is_file() and (tmp_path / "r2" / "encoder.pt").is_file()


def test_index_search_and_duplicates_twice_each(trained_run, tmp_path):
    photos = trained_run.parent / "photos"
    for _ in range(2):
        summary = instret.build_index(photos, trained_run, tmp_path / "idx", workers=0)
    # The second build found nothing changed and kept the generation it had.
    assert (summary["encoded"], summary["vectors"], summary["generation"]) == (0, 30, "gen-000001")
    assert sorted(p.name for p in (tmp_path / "idx").glob("gen-*")) == ["gen-000001"]
    query = sorted(photos.rglob("*.jpg"))[3]
    for _ in range(2):
        hits = instret.search(tmp_path / "idx", [query], k=3)
    assert hits[0]["query"] == str(query) and hits[0]["results"][0]["path"] == str(query)
    assert hits[0]["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    searcher = instret.Searcher(tmp_path / "idx")
    # One path alone is one query; a second Searcher answers the same.
    assert searcher.query(query, k=1) == instret.Searcher(tmp_path / "idx").query([query], k=1)
    assert instret.find_duplicates(tmp_path / "idx", threshold=0.9999) == instret.find_duplicates(
        tmp_path / "idx", threshold=0.9999
    )


def test_embed_takes_paths_pil_images_and_tensors_alike(trained_run, tmp_path):
    png = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(png)
    enc = instret.load_encoder(trained_run)
    assert instret.load_encoder(trained_run).fingerprint == enc.fingerprint
    pil = Image.open(png)
    as_uint8 = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
    rows = enc.embed([png, pil, as_uint8, as_uint8.float() / 255])
    assert rows.shape == (4, enc.dim) and rows.dtype == np.float32
    for r in rows[1:]:
        np.testing.assert_allclose(r, rows[0], atol=1e-5)
    np.testing.assert_allclose(enc.embed(as_uint8[None].expand(2, -1, -1, -1)), rows[:2], atol=1e-5)  # a batch
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
    # Searching by an image in memory gives what searching by its file gives.
    instret.build_index(tmp_path, trained_run, tmp_path / "idx", workers=0)
    by_file, by_pil = instret.search(tmp_path / "idx", [png, pil], k=1)
    assert by_pil["query"] == "<image 1>" and by_pil["results"] == by_file["results"]


@pytest.mark.parametrize("bad, says", [(3.5, "not float"), (torch.zeros(2, 8, 8), r"not \(2, 8, 8\)")])
def test_embed_names_what_it_cannot_use(trained_run, bad, says):
    with pytest.raises(instret.InstretError, match=says):
        instret.load_encoder(trained_run).embed([bad])


def test_import_instret_does_not_import_torch():
    code = "import sys, instret; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
