import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
            img[y:y + s, x:x + s] = colours.get(c, (200, 200, 0))
            Image.fromarray(img).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Tests compare runs bit for bit: keep the thread count fixed within the suite.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
