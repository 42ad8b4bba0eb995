import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instret import losses, neighbours
from instret.knn import torch_search


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def brute_force_nearest(bank: np.ndarray, k: int):
    """Each row's k most similar other rows by a full NumPy sort (ties: the lower id first)."""
    sims = bank @ bank.T
    np.fill_diagonal(sims, -np.inf)
    ids = np.stack([sorted(range(len(bank)), key=lambda j, r=r: (-r[j], j))[:k] for r in sims])
    return np.take_along_axis(sims, ids, axis=1), ids


@pytest.mark.parametrize("n, k", [(50, 5), (200, 10), (33, 32)])
def test_mining_equals_a_brute_force_numpy_search(n, k):
    bank = unit(n, 16, seed=n)
    sims, ids = neighbours.nearest_rows(bank, k, chunk=17)  # several chunks
    want_sims, want_ids = brute_force_nearest(bank.double().numpy(), k)
    assert np.array_equal(ids.numpy(), want_ids)
    assert np.allclose(sims.numpy(), want_sims, atol=1e-5)


def test_mining_a_bank_on_the_gpu_hands_faiss_the_bank_itself(monkeypatch):
    """faiss-gpu seeing a GPU, faked: the bank tensor itself goes to FAISS's GPU brute force, and
    the answer is the brute-force one."""
    import faiss
    import faiss.contrib.torch_utils  # what instret imports first

    from instret import faiss_boundary
    from instret import knn as knn_module

    calls = []

    def fake_knn_gpu(res, xq, xb, k, metric=None, device=-1):
        calls.append(xb)
        return torch_search(xq, xb, k)

    monkeypatch.setattr(faiss, "knn_gpu", fake_knn_gpu, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(knn_module, "faiss_gpu_count", lambda: 1)
    faiss_boundary.gpu_resources.cache_clear()
    try:
        bank = unit(120, 8, seed=3)
        sims, ids = neighbours.nearest_rows(bank, 6, chunk=50, in_place=True)
        assert len(calls) == 3 and all(x.data_ptr() == bank.data_ptr() for x in calls)
        want_sims, want_ids = brute_force_nearest(bank.double().numpy(), 6)
        assert np.array_equal(ids.numpy(), want_ids)
        assert np.allclose(sims.numpy(), want_sims, atol=1e-5)
    finally:
        faiss_boundary.gpu_resources.cache_clear()


def neighbourhood_loss_loop(f, bank, idx, nb, tau):
    """-1/B sum_i log sum_{j in {i} + N(i)} exp(v_j . f_i / tau) / sum_j exp(v_j . f_i / tau)."""
    total = 0.0
    for b in range(len(f)):
        z = sum(math.exp(float(bank[j] @ f[b]) / tau) for j in range(len(bank)))
        members = {int(idx[b])} | {int(j) for j in nb[b] if j >= 0}
        total += -math.log(sum(math.exp(float(bank[j] @ f[b]) / tau) for j in members) / z)
    return total / len(f)


@pytest.mark.parametrize("tau", [0.07, 0.1, 0.5])
def test_the_neighbourhood_loss_equals_a_loop_from_the_formula(tau):
    f, bank = unit(5, 16, seed=1).double(), unit(40, 16, seed=2).double()
    idx = torch.tensor([0, 5, 9, 17, 33])
    nb = torch.tensor([[3, 4, -1], [-1, -1, -1], [1, 2, 39], [16, -1, -1], [0, 8, -1]])
    fast = float(losses.neighbourhood_loss(f, bank, idx, nb, tau))
    assert fast == pytest.approx(neighbourhood_loss_loop(f, bank, idx, nb, tau), rel=1e-9)


def test_neighbourhoods_of_one_give_the_papers_loss():
    f, bank = unit(6, 16, seed=4).double(), unit(30, 16, seed=5).double()
    idx = torch.tensor([0, 3, 7, 11, 20, 29])
    none = torch.full((6, 4), -1)
    alone = losses.neighbourhood_loss(f, bank, idx, none, 0.1)
    assert float(alone) == pytest.approx(float(losses.softmax_loss(f, bank, idx, 0.1)), rel=1e-12)


def test_the_neighbourhood_loss_of_a_whole_bank_is_zero():
    f, bank = unit(3, 8, seed=6).double(), unit(10, 8, seed=7).double()
    idx = torch.tensor([0, 1, 2])
    everyone = torch.tensor([[j for j in range(10) if j != i] for i in range(3)])
    assert float(losses.neighbourhood_loss(f, bank, idx, everyone, 0.1)) == pytest.approx(0.0, abs=1e-12)


def test_the_curriculum_share_grows_by_a_round_each_round():
    assert [neighbours.curriculum_share(r, 4) for r in (1, 2, 3, 4, 5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    sims, ids = neighbours.nearest_rows(unit(80, 8, seed=8), 10)
    for r in range(1, 5):
        found = neighbours.anchor_neighbourhoods(sims, ids, neighbours.curriculum_share(r, 4), 1, 0.1)
        assert int((found >= 0).any(dim=1).sum()) == 20 * r


def test_anchors_are_the_rows_of_lowest_entropy_with_their_nearest_rows():
    sims, ids = neighbours.nearest_rows(unit(60, 8, seed=9), 10)
    logp = torch.log_softmax(sims.double() / 0.1, dim=1)
    entropy = -(logp.exp() * logp).sum(dim=1)
    found = neighbours.anchor_neighbourhoods(sims, ids, 0.5, 2, 0.1)
    chosen = set(entropy.argsort()[:30].tolist())
    for i in range(60):
        assert found[i].tolist() == (ids[i, :2].tolist() if i in chosen else [-1, -1])


def test_mutual_neighbours_equal_a_pairwise_check():
    bank = unit(90, 6, seed=10)
    sims, ids = neighbours.nearest_rows(bank, 10)
    found = neighbours.mutual_neighbourhoods(sims, ids, 4, threshold=0.5)
    near = [set(ids[i, :4].tolist()) for i in range(90)]
    cos = bank @ bank.T
    for i in range(90):
        want = [int(j) for j in ids[i, :4] if i in near[int(j)] and cos[i, j] >= 0.5]
        assert [j for j in found[i].tolist() if j >= 0] == want


def test_the_mutual_rules_share_keeps_the_most_similar_rows():
    bank = unit(90, 6, seed=11)
    sims, ids = neighbours.nearest_rows(bank, 10)
    every = neighbours.mutual_neighbourhoods(sims, ids, 4, threshold=-1.0)
    some = neighbours.mutual_neighbourhoods(sims, ids, 4, threshold=-1.0, share=0.2)
    kept = (some >= 0).any(dim=1)
    assert int(kept.sum()) == 18
    best = sims[:, 0]  # with no threshold a row's best mutual neighbour is its nearest: mutual k=4
    assert best[kept].min() >= best[~kept & (every >= 0).any(dim=1)].max()
    for i in kept.nonzero().flatten().tolist():
        assert some[i].tolist()[: every.shape[1]] == every[i].tolist()[: some.shape[1]]


def test_round_figures_count_rows_sizes_groups_and_agreement():
    nb = torch.tensor([[1, -1], [0, 2], [-1, -1], [-1, -1], [5, -1], [4, -1]])
    figures = neighbours.round_figures(nb, previous=torch.tensor([[1], [0], [-1], [-1], [3], [-1]]))
    assert figures["neighbourhood_rows"] == 4
    assert figures["neighbourhood_size"] == pytest.approx((2 + 3 + 2 + 2) / 4)
    assert figures["neighbourhood_largest"] == pytest.approx(3 / 6)  # rows 0, 1, 2
    assert figures["neighbourhood_agreement"] == pytest.approx(1 / 2)  # (0, 1) kept, (3, 4) gone


def test_rounds_run_from_the_start_fraction_to_four_fifths_of_the_run():
    assert neighbours.FIRST_ROUND_EPOCH == 20
    assert neighbours.round_epochs(100, 4, 0.3) == [30, 42, 55, 68]
    assert neighbours.round_epochs(30, 4, 0.3) == [20, 20, 20, 20]  # never before epoch 20
    assert neighbours.round_epochs(20, 4, 0.3) == []  # a short run has none


def test_the_multi_view_check_does_not_count_neighbours_that_are_copies_of_one_picture(tmp_path):
    """Rows 0-1 are a photo and its edited copy, 2-3 two different pictures, 4 has a copy (5)
    and a different picture (2) among its confident neighbours: 2, 3 and 4 of the 6 rows have
    a neighbour that is not a copy."""
    import random

    from instret.edits import edited_copy
    from tests.test_verify import texture

    pictures = [texture(s) for s in range(4)]
    files = [
        pictures[0],
        edited_copy(pictures[0], "crop", random.Random(0)),
        pictures[1],
        pictures[2],
        pictures[3],
        edited_copy(pictures[3], "jpeg", random.Random(1)),
    ]
    paths = []
    for n, img in enumerate(files):
        paths.append(str(tmp_path / f"{n}.png"))
        img.save(paths[-1])
    confident = torch.tensor([[1, -1], [0, -1], [3, 4], [2, -1], [5, 2], [4, -1], [-1, -1]])
    paths.append(str(tmp_path / "no neighbour.png"))
    assert neighbours.beyond_copies(confident, paths, seed=0) == pytest.approx(3 / 6)
    # A sample of two of the six rows: the share among them, the same for the same seed.
    sampled = neighbours.beyond_copies(confident, paths, seed=3, rows=2)
    assert sampled in (0.0, 0.5, 1.0) and sampled == neighbours.beyond_copies(confident, paths, seed=3, rows=2)
    assert neighbours.beyond_copies(torch.full((3, 1), -1), paths[:3], seed=0) == 0.0


def test_the_check_without_files_counts_every_confident_neighbour():
    from instret.config import TrainConfig
    from instret.discovery import NeighbourhoodDiscovery

    torch.manual_seed(0)
    bank = F.normalize(torch.randn(6, 8), dim=1)
    bank[1] = F.normalize(bank[0] + 0.01 * torch.randn(8), dim=0)  # 0 and 1 nearly the same
    found = NeighbourhoodDiscovery(6, torch.device("cpu"))
    found.view_cosine.fill_(0.95)
    cfg = TrainConfig(neighbour_k=1)
    assert found.views_share(cfg, bank, None) == (pytest.approx(2 / 6), pytest.approx(2 / 6), pytest.approx(0.95))
