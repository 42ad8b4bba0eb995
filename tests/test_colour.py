"""instret.colour: the colour signature an encoder trained for several views searches beside its features."""

import json

import numpy as np
import pytest
import torch

from instret import colour
from instret.encoder import load_encoder, save_encoder
from instret.indexer import build_index
from instret.searcher import Searcher
from tests.test_cli import run_cli
from tests.test_export import _images
from tests.test_index import QUIET


def reference_signature(image: np.ndarray) -> np.ndarray:
    """One uint8 3 x S x S image, pixel by pixel: the share of each of the 512 colours, ^(1/4), unit length."""
    counts = np.zeros(colour.DIM)
    for r, g, b in image.reshape(3, -1).T.astype(int):
        counts[(r // 32) * 64 + (g // 32) * 8 + b // 32] += 1
    share = (counts / counts.sum()) ** 0.25
    return share / np.linalg.norm(share)


def test_the_signature_equals_a_pixel_by_pixel_count():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 12, 12), dtype=np.uint8))
    images[2] = 255  # one colour alone: all the mass in the last bin
    got = colour.colour_signature(images).numpy()
    want = np.stack([reference_signature(x) for x in images.numpy()])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[2, -1] == pytest.approx(1.0)


def test_the_joined_cosine_is_the_weighted_mean_of_the_two():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8))
    features = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(2, 16)).astype(np.float32)), dim=1)
    for weight in (0.5, 1.0, 3.0):
        joined = colour.with_colour(features, images, weight)
        c = colour.colour_signature(images)
        want = (features[0] @ features[1] + weight * (c[0] @ c[1])) / (1 + weight)
        assert float(joined[0] @ joined[1]) == pytest.approx(float(want), abs=1e-6)
        assert torch.allclose(joined.norm(dim=1), torch.ones(2), atol=1e-6)


@pytest.fixture
def colour_model(trained_run, tmp_path):
    """The suite's encoder saved as one trained for several views."""
    plain = load_encoder(trained_run)
    path = tmp_path / "colour" / "encoder.pt"
    path.parent.mkdir()
    save_encoder(plain.model, path, plain.mean, plain.std, colour_weight=1.0)
    return path


def test_an_encoder_trained_for_views_searches_its_features_with_colour(trained_run, colour_model, tmp_path):
    plain, joined = load_encoder(trained_run), load_encoder(colour_model)
    assert joined.dim == plain.dim + colour.DIM and joined.colour_weight == 1.0
    assert joined.fingerprint != plain.fingerprint  # other vectors: an index of one is not updated with the other
    images = _images(plain.image_size)
    x, f = joined.embed(list(images)), plain.embed(list(images))
    np.testing.assert_allclose(x[:, : plain.dim] * 2**0.5, f, atol=1e-5)
    np.testing.assert_allclose(x[:, plain.dim :] * 2**0.5, colour.colour_signature(images).numpy(), atol=1e-5)
    photos = trained_run.parent / "photos"
    build_index(photos, colour_model, tmp_path / "index", **QUIET)
    hits = Searcher(tmp_path / "index").query([photos / "b" / "003.jpg"], k=2)[0]["results"]
    assert hits[0]["path"].endswith("b/003.jpg") and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_the_exported_encoder_joins_the_colour_signature_too(colour_model, tmp_path, capsys):
    out = tmp_path / "enc.pt"
    code, stdout, err = run_cli(["export", str(colour_model), "--format", "torchscript", "--out", str(out)], capsys)
    assert code == 0, err
    enc = load_encoder(colour_model)
    assert json.loads(stdout)["low_dim"] == enc.dim and "colour signature" in stdout
    images = _images(enc.image_size)
    np.testing.assert_allclose(torch.jit.load(str(out))(images).numpy(), enc.embed(list(images)), atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    code, _, err = run_cli(["export", str(colour_model), "--format", "onnx", "--out", str(tmp_path / "e.onnx")], capsys)
    assert code == 0, err
    (features,) = ort.InferenceSession(str(tmp_path / "e.onnx")).run(None, {"images": images.numpy()})
    np.testing.assert_allclose(features, enc.embed(list(images)), atol=1e-4)
