"""The same checks on whichever device INSTRET_TEST_DEVICE names (cpu by default): the suite runs
them on the CPU, `benchmarks/gpu_check.sh` on a GPU (`pytest -m device`). Each compares the
device's answer with the CPU's, so on the CPU they check the comparison itself."""

import os

import pytest
import torch
import torch.nn.functional as F

from instret import augment as A
from instret.config import TrainConfig
from instret.data import load_train_data
from instret.encoder import Encoder, embed_images
from instret.knn import FeatureIndex, knn_evaluate
from instret.trainer import Trainer
from tests.conftest import make_image_folder

pytestmark = pytest.mark.device


@pytest.fixture
def device() -> torch.device:
    name = os.environ.get("INSTRET_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("INSTRET_TEST_DEVICE names a GPU and torch sees none")
    return torch.device(name)


def test_augmentation_on_the_device_matches_the_cpu(device):
    aug = A.Augment(24, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), rotate=10, erase_p=0.5, blur_p=0.5)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = aug.sample_params(16, 32, 32, torch.Generator().manual_seed(1), "cpu")
    moved = A.AugmentParams(*(None if v is None else v.to(device) for v in vars(params).values()))
    on_cpu = aug.apply(images, params)
    on_device = aug.apply(images.to(device), moved).cpu()
    assert torch.allclose(on_cpu, on_device, atol=1e-4)


def test_embedding_on_the_device_matches_the_cpu(device):
    torch.manual_seed(0)
    model = Encoder("small", 128, 32).eval()
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    on_cpu = embed_images(model, images, (0.5,) * 3, (0.25,) * 3)
    on_device = embed_images(model.to(device), images.to(device), (0.5,) * 3, (0.25,) * 3).cpu()
    assert F.cosine_similarity(on_cpu, on_device).min() > 0.999


def test_knn_of_a_bank_on_the_device_matches_faiss_on_the_cpu(device):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(5, 32, generator=g)
    labels = torch.randint(0, 5, (600,), generator=g)
    bank = F.normalize(centres[labels] + torch.randn(600, 32, generator=g), dim=1)
    queries = F.normalize(centres[labels[:100]] + torch.randn(100, 32, generator=g), dim=1)
    found = {}
    for where, table in (("cpu", bank), ("device", bank.to(device))):
        index = FeatureIndex()
        index.sync(table)
        found[where] = knn_evaluate(index, labels, queries.to(table.device), labels[:100], 5, k=20)
        found[where + "_engine"] = index.engine
    assert found["device"] == pytest.approx(found["cpu"], abs=0.011)  # at most one tie broken otherwise
    assert found["cpu_engine"] == "faiss-cpu" and found["device_engine"] in (
        ("faiss-cpu",) if device.type == "cpu" else ("torch", "faiss-gpu")
    )


def test_training_steps_on_the_device_with_autocast(device, tmp_path):
    folder = make_image_folder(tmp_path / "images", per_class=6)
    cfg = TrainConfig(data=str(folder), arch="small", epochs=1, image_size=16, batch_size=8, knn_k=5, workers=0,
                      amp=True, out=str(tmp_path / "run"))  # fmt: skip
    trainer = Trainer(cfg, load_train_data(cfg), device)
    assert torch.backends.cudnn.benchmark == (device.type == "cuda")  # tuned kernels for the fixed batch shape
    row = trainer.train_epoch()
    trainer.monitor()
    assert torch.isfinite(torch.tensor(row["loss"])) and trainer.bank.features.device.type == device.type
    norms = trainer.bank.features.float().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)  # bank rows stay unit vectors under bf16
    assert 0 <= trainer.history[-1]["knn_top1"] <= 1 and trainer.history[-1]["knn_engine"]
