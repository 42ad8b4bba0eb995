import numpy as np
import pytest

from instret.errors import InstretError
from instret.postprocess import Whitening, expand_database, expand_queries, fit_whitening, normalise


def _data(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    # Anisotropic, off-centre data: a few strong shared directions, as learned features have.
    x = rng.normal(size=(n, d)) * np.linspace(3.0, 0.2, d) + rng.normal(size=d) * 2
    return normalise(x @ np.linalg.qr(rng.normal(size=(d, d)))[0])


def _reference_whitening(x, s):
    """Straight from the definition, through the SVD of the centred data rather than eigh."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    _, sing, vt = np.linalg.svd(x - mean, full_matrices=False)
    lam = sing**2 / (len(x) - 1)
    shrunk = (1 - s) * lam + s * lam.mean()
    return lambda q: normalise((q - mean) @ vt.T @ np.diag(shrunk**-0.5) @ vt)


@pytest.mark.parametrize("s", [0.0, 0.25, 0.7])
def test_whitening_matches_a_reference_built_from_the_svd(s):
    x = _data()
    q = _data(20, seed=1)
    np.testing.assert_allclose(fit_whitening(x, s)(q), _reference_whitening(x, s)(q), atol=1e-5)


def test_full_whitening_gives_the_collection_identity_covariance():
    x = _data().astype(np.float64)
    w = fit_whitening(x, shrinkage=0.0)
    y = (x - w.mean) @ w.projection  # before the final normalisation
    np.testing.assert_allclose(np.cov(y.T), np.eye(x.shape[1]), atol=1e-6)


def test_full_shrinkage_is_centring_alone():
    x, q = _data(), _data(10, seed=2)
    np.testing.assert_allclose(fit_whitening(x, 1.0)(q), normalise(q - x.astype(np.float64).mean(axis=0)), atol=1e-5)


def test_whitening_round_trips_through_its_file(tmp_path):
    w = fit_whitening(_data(), 0.25)
    w.save(tmp_path / "w.npz")
    back = Whitening.load(tmp_path / "w.npz")
    q = _data(5, seed=3)
    np.testing.assert_array_equal(back(q), w(q))
    assert back.shrinkage == 0.25


def test_a_damaged_whitening_file_is_one_clear_error(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"not numpy")
    with pytest.raises(InstretError, match="damaged"):
        Whitening.load(tmp_path / "w.npz")


def test_alpha_query_expansion_matches_a_loop():
    db, q = _data(50), _data(4, seed=5)
    sims = q @ db.T
    top = np.argsort(-sims, axis=1)[:, :3]
    got = expand_queries(q, db, top, np.take_along_axis(sims, top, axis=1), alpha=3.0)
    for r in range(len(q)):
        want = q[r].astype(np.float64).copy()
        for j in top[r]:
            want += max(sims[r, j], 0) ** 3 * db[j]
        np.testing.assert_allclose(got[r], want / np.linalg.norm(want), atol=1e-5)


def test_database_augmentation_matches_a_loop():
    db = _data(40)
    got = expand_database(db, k=3, alpha=1.0, chunk=7)  # several blocks
    for i in range(len(db)):
        sims = db @ db[i]
        want = sum(max(sims[j], 0) * db[j].astype(np.float64) for j in np.argsort(-sims, kind="stable")[:3])
        np.testing.assert_allclose(got[i], want / np.linalg.norm(want), atol=1e-5)
