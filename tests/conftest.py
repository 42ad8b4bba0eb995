import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from instret.env import usable_cpus

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def make_image_folder(root: Path, classes=("red", "green", "blue"), per_class=12, size=24, seed=0) -> Path:
    """Class sub-folders of small PNGs: a coloured square at a random place on a noisy background."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "gray": (128, 128, 128)}
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            s = int(rng.integers(size // 3, size // 2))
            y, x = rng.integers(0, size - s, 2)
            img[y : y + s, x : x + s] = colours.get(c, (200, 200, 0))
            Image.fromarray(img).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def suite_threads() -> int:
    """Threads for each test's torch and for the processes tests start: the cores, at most 2,
    shared among pytest-xdist's workers (`-n`), so that no torch spins against another's threads
    (measured with 2 threads in each of 2 workers on 2 cores: slower than one worker alone)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, usable_cpus() // workers))


def pytest_configure(config):
    os.environ["OMP_NUM_THREADS"] = str(suite_threads())  # what the processes tests start inherit


def pytest_collection_modifyitems(items):
    # The longest tests first: under -n, the other workers share out the rest while they run,
    # rather than one worker being left with a long test at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Tests compare runs bit for bit: keep the thread count fixed within the suite.
    torch.set_num_threads(suite_threads())
    yield


def make_photos(root: Path, groups=("a", "b", "c"), per_group=8, size=48, seed=0) -> Path:
    """Varied synthetic 'photos': smooth random colour fields with a few bright blobs, as JPEG."""
    rng = np.random.default_rng(seed)
    for g in groups:
        (root / g).mkdir(parents=True, exist_ok=True)
        tint = rng.uniform(0.3, 1.0, 3)
        for i in range(per_group):
            low = rng.uniform(0, 1, (6, 6, 3)) * tint
            img = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
            img = img.copy()
            for _ in range(3):
                y, x = rng.integers(0, size - 10, 2)
                img[y : y + 8, x : x + 8] = rng.integers(0, 256, 3)
            Image.fromarray(img).save(root / g / f"{i:03d}.jpg", quality=92)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run folder whose encoder has trained briefly on synthetic photos (shared by search tests)."""
    from instret.run import train

    base = tmp_path_factory.mktemp("trained")
    photos = make_photos(base / "photos", per_group=10, seed=42)
    out = base / "run"
    # Mild augmentation: the paper's hue jitter and 20 % crops erase what tells these photos apart.
    # float32 (amp off): the search tests' figures then do not depend on whether the CPU has AMX.
    train(
        {
            "data": str(photos),
            "out": str(out),
            "epochs": 30,
            "image_size": 32,
            "batch_size": 10,
            "knn_k": 5,
            "workers": 0,
            "crop_scale": (0.6, 1.0),
            "jitter": 0.1,
            "grayscale_p": 0.0,
            "amp": False,
        }
    )
    return out


@pytest.fixture
def indexed(trained_run, tmp_path):
    """(photos, index folder): a copy of the trained run's photos, indexed with its encoder."""
    import shutil

    from instret.indexer import build_index

    photos = shutil.copytree(trained_run.parent / "photos", tmp_path / "photos")
    build_index(photos, trained_run, tmp_path / "ix", workers=0, device="cpu")
    return photos, tmp_path / "ix"
