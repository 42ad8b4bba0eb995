import sys

import pytest
import torch

from instret.data import load_cifar10
from instret.encoder import Encoder, embed_images, fingerprint, load_encoder, resolve_arch, save_encoder
from instret.errors import InstretError


@pytest.mark.parametrize("arch,size", [("small", 32), ("resnet18", 32), ("resnet18", 96), ("resnet50", 32)])
def test_output_is_unit_norm_low_dim(arch, size):
    model = Encoder(arch, low_dim=16, image_size=size).eval()
    with torch.no_grad():
        f = model(torch.randn(2, 3, size, size))
    assert f.shape == (2, 16)
    assert torch.allclose(f.norm(dim=1), torch.ones(2), atol=1e-5)


def test_small_image_stem_for_resnets():
    small = Encoder("resnet18", image_size=32).backbone
    large = Encoder("resnet18", image_size=224).backbone
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and not isinstance(large.maxpool, torch.nn.Identity)


def test_export_then_load_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    model = Encoder("small", 32, 16)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    fp = save_encoder(model, tmp_path / "encoder.pt", mean, std)
    loaded = load_encoder(tmp_path)  # a run folder works too
    assert loaded.fingerprint == fp and loaded.mean == mean and loaded.dim == 32 and loaded.image_size == 16
    assert torch.equal(embed_images(model, images, mean, std), embed_images(loaded.model, images, mean, std))


def test_fingerprint_follows_the_weights():
    a = Encoder("small", 8, 16).state_dict()
    b = {k: v.clone() for k, v in a.items()}
    assert fingerprint(a) == fingerprint(b)
    b["head.bias"] += 1e-3
    assert fingerprint(a) != fingerprint(b)


def test_load_refuses_garbage_and_missing(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InstretError, match="not a readable encoder"):
        load_encoder(tmp_path / "bad.pt")
    with pytest.raises(InstretError, match="no such encoder"):
        load_encoder(tmp_path / "missing.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(InstretError, match="not an instret encoder"):
        load_encoder(tmp_path / "other.pt")


def test_auto_arch():
    assert resolve_arch("auto", torch.device("cpu")) == "small"
    assert resolve_arch("auto", torch.device("cuda")) == "resnet18"
    assert resolve_arch("resnet50", torch.device("cpu")) == "resnet50"


def test_without_torchvision_a_resnet_is_refused_in_one_line_and_the_small_cnn_still_builds(monkeypatch):
    # A CPU-only torch install may come without torchvision: only the ResNets and CIFAR-10 need it.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(InstretError, match="--arch resnet18 needs torchvision"):
        Encoder("resnet18")
    with pytest.raises(InstretError, match="--dataset cifar10 needs torchvision"):
        load_cifar10("data", download=False)
    assert Encoder("small")(torch.rand(2, 3, 32, 32)).shape == (2, 128)
