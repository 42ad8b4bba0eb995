import json

import numpy as np
import pytest
import torch
from PIL import Image

from instret.encoder import load_encoder
from instret.images import square_tensor
from tests.test_cli import run_cli


def _images(size: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(3)]
    return torch.stack([square_tensor(p, size) for p in pictures])


def test_torchscript_export_gives_instrets_vectors_and_states_its_preprocessing(trained_run, tmp_path, capsys):
    out = tmp_path / "enc.pt"
    code, stdout, err = run_cli(["export", str(trained_run), "--format", "torchscript", "--out", str(out)], capsys)
    assert code == 0, err
    enc = load_encoder(trained_run)
    files = {"instret.json": ""}
    module = torch.jit.load(str(out), _extra_files=files)
    meta = json.loads(files["instret.json"])
    assert meta == {k: v for k, v in json.loads(stdout).items() if k != "out"}
    assert meta["image_size"] == enc.image_size and meta["mean"] == list(enc.mean) and meta["std"] == list(enc.std)
    assert any("resize the shorter side" in step for step in meta["preprocessing"])
    images = _images(enc.image_size)
    np.testing.assert_allclose(module(images).numpy(), enc.embed(list(images)), atol=1e-5)


def test_onnx_export_runs_in_onnxruntime_with_instrets_vectors(trained_run, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "enc.onnx"
    code, _, err = run_cli(["export", str(trained_run), "--format", "onnx", "--out", str(out)], capsys)
    assert code == 0, err
    enc = load_encoder(trained_run)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["producer"] == "instret" and json.loads(props["image_size"]) == enc.image_size
    assert props["encoder_fingerprint"] == enc.fingerprint
    images = _images(enc.image_size)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"images": images.numpy()})
    np.testing.assert_allclose(features, enc.embed(list(images)), atol=1e-4)


def test_export_refuses_a_folder_without_an_encoder(tmp_path, capsys):
    code, _, err = run_cli(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "x.onnx")], capsys)
    assert code == 1 and "no encoder.pt here" in err and not (tmp_path / "x.onnx").exists()
