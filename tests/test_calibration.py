"""The calibration against the truth on real photos: folders of 300 and of 3,925 Imagenette
photos with no copies among them (every pair of files unrelated), indexed with the suite's
encoder; the count of unrelated pairs predicted above a score (instret.calibration) against the
count there is, at the scores the 1st, 3rd, 10th, ... 1000th strongest pair reach.

Held, and tested: within a factor of 2 at every count from 3 up on 300 photos, and from 300 up
on 3,925. Not held at the top of the larger folder: there the far tail depends on the encoder
(this briefly trained one: 6.5x too many predicted at the 3rd pair, 2x at the 100th; one
trained 5 minutes on the folder itself: 3x too few at the 3rd, bursts of one scene such as one
tench held up twice; benchmarks/calibration.py prints both ways). `dups` does not rest on it
for precision: every pair in the copies' range is verified (instret.verify)."""

import random
import shutil

import numpy as np
import pytest

from instret.calibration import unrelated_share
from instret.index import SearchIndex
from instret.indexer import build_index
from tests.conftest import SHARED

IMAGENETTE = SHARED / "imagenette2" / "val"
COUNTS = (1, 3, 10, 30, 100, 300, 1000)
HELD_FROM = {300: 3, 3925: 300}  # photos: the smallest count the factor of 2 is held at


def predicted_and_observed(index_dir) -> list[tuple[int, float]]:
    index = SearchIndex(index_dir)
    vectors, _ = index.vectors()
    searched = index.transform(np.asarray(vectors)).astype(np.float64)
    n = len(searched)
    scores = np.sort((searched @ searched.T)[np.triu_indices(n, 1)])[::-1]
    pairs = n * (n - 1) / 2
    out = [(k, pairs * float(unrelated_share(scores[k - 1], index.manifest["scores"]))) for k in COUNTS]
    index.close()
    return out


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason="needs ../shared/datasets/imagenette2")
@pytest.mark.parametrize("photos", [300, 3925])
def test_the_predicted_unrelated_count_is_within_2x_of_the_observed_one(trained_run, tmp_path, photos):
    files = sorted(IMAGENETTE.rglob("*.JPEG"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, path in enumerate(random.Random(photos).sample(files, photos)):
        shutil.copyfile(path, folder / f"{k:05d}.jpg")
    build_index(folder, trained_run, tmp_path / "ix", workers=0, device="cpu")
    rows = predicted_and_observed(tmp_path / "ix")
    held = [(observed, round(predicted, 1)) for observed, predicted in rows if observed >= HELD_FROM[photos]]
    assert held and all(observed / 2 <= predicted <= 2 * observed for observed, predicted in held), rows
