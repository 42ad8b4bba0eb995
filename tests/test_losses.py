import math

import pytest
import torch
import torch.nn.functional as F

from instret import losses


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def softmax_loss_loop(f, bank, idx, tau):
    """-1/B sum_i log( exp(v_i . f_i / tau) / sum_j exp(v_j . f_i / tau) ), straight from the paper."""
    total = 0.0
    for b in range(len(f)):
        z = sum(math.exp(float(bank[j] @ f[b]) / tau) for j in range(len(bank)))
        total += -math.log(math.exp(float(bank[idx[b]] @ f[b]) / tau) / z)
    return total / len(f)


def nce_loss_loop(f, bank, idx, noise, tau, z):
    """-log h(i, v) - sum_k log(1 - h(j_k, v)), h = P / (P + m P_n), P = exp(v . f / tau) / Z."""
    n, m = len(bank), noise.shape[1]
    pn = 1.0 / n
    total = 0.0
    for b in range(len(f)):
        p_pos = math.exp(float(bank[idx[b]] @ f[b]) / tau) / z
        loss = -math.log(p_pos / (p_pos + m * pn))
        for j in noise[b].tolist():
            p = math.exp(float(bank[j] @ f[b]) / tau) / z
            loss -= math.log(1 - p / (p + m * pn))
        total += loss
    return total / len(f)


@pytest.mark.parametrize("tau", [0.07, 0.1, 0.5])
def test_softmax_loss_equals_paper_loop(tau):
    f, bank = unit(6, 16, seed=1).double(), unit(40, 16, seed=2).double()
    idx = torch.tensor([0, 5, 9, 17, 33, 39])
    assert float(losses.softmax_loss(f, bank, idx, tau)) == pytest.approx(
        softmax_loss_loop(f, bank, idx, tau), rel=1e-9
    )


def test_softmax_loss_closed_form_orthonormal_bank():
    # Bank = identity rows, f_i = e_i: logit of the positive is 1/tau, all others 0.
    n, tau = 8, 0.1
    bank = torch.eye(n, dtype=torch.float64)
    idx = torch.arange(n)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (n - 1)))
    assert float(losses.softmax_loss(bank, bank, idx, tau)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("m", [1, 7, 64])
def test_nce_loss_equals_paper_loop(m):
    f, bank = unit(5, 16, seed=3).double(), unit(50, 16, seed=4).double()
    idx = torch.tensor([1, 2, 3, 10, 49])
    noise = torch.randint(0, 50, (5, m), generator=torch.Generator().manual_seed(5))
    z = losses.estimate_nce_z(f, bank, noise, 0.1)
    fast = float(losses.nce_loss(f, bank, idx, noise, 0.1, z))
    assert fast == pytest.approx(nce_loss_loop(f, bank, idx, noise, 0.1, z), rel=1e-9)


def test_nce_z_is_n_times_mean_exp():
    f, bank = unit(4, 8, seed=6).double(), unit(30, 8, seed=7).double()
    noise = torch.randint(0, 30, (4, 9), generator=torch.Generator().manual_seed(8))
    slow = 30 * sum(math.exp(float(bank[j] @ f[b]) / 0.2) for b in range(4) for j in noise[b].tolist()) / 36
    assert losses.estimate_nce_z(f, bank, noise, 0.2) == pytest.approx(slow, rel=1e-9)


def test_nce_z_of_a_global_batch_pools_the_processes_sums():
    # Two processes, each with half the batch: Z from the pooled sums equals Z of the whole batch.
    f, bank = unit(6, 8, seed=9).double(), unit(30, 8, seed=10).double()
    noise = losses.nce_noise(30, 6, 5, torch.Generator().manual_seed(11))
    halves = [(f[:3], noise[:3]), (f[3:], noise[3:])]
    other = {}

    def pooled(mine):  # what all_sum does, with the other process's sums known in advance
        return mine + other["sums"]

    sims = torch.einsum("bd,bmd->bm", halves[1][0], bank[halves[1][1]])
    other["sums"] = torch.stack([torch.exp(sims / 0.1).sum(), sims.new_tensor(float(sims.numel()))])
    z = losses.estimate_nce_z(halves[0][0], bank, halves[0][1], 0.1, pooled)
    assert z == pytest.approx(losses.estimate_nce_z(f, bank, noise, 0.1), rel=1e-12)


def test_nce_noise_is_the_generators_draw():
    a = losses.nce_noise(50, 4, 7, torch.Generator().manual_seed(3))
    b = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 7)


def test_nce_closed_form_when_similarities_are_zero():
    # All similarities 0 -> P = 1/Z for every row; with Z = n, h = 1/(1+m) for every row.
    n, m, d = 10, 4, 10
    bank = torch.eye(n, dtype=torch.float64)
    f = torch.zeros(1, d, dtype=torch.float64)
    noise = torch.tensor([[1, 2, 3, 4]])
    h = 1 / (1 + m)
    expected = -math.log(h) - m * math.log(1 - h)
    assert float(losses.nce_loss(f, bank, torch.tensor([0]), noise, 0.1, z=float(n))) == pytest.approx(expected)


def test_nce_is_finite_for_extreme_similarities():
    f = unit(3, 8, seed=9)
    bank = torch.cat([f, unit(20, 8, seed=10)])
    noise = torch.zeros(3, 16, dtype=torch.long)  # noise = the positive itself, similarity 1
    loss = losses.nce_loss(f, bank, torch.arange(3), noise, tau=0.01, z=1e-30)
    assert torch.isfinite(loss)


def test_proximal_term_closed_form_and_gradient():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    prev = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    term = losses.proximal_term(f, prev, lam=0.5)
    assert float(term.detach()) == pytest.approx(0.5 * (2.0 + 0.0) / 2)  # ||e1 - e2||^2 = 2, second row 0
    term.backward()
    assert torch.allclose(f.grad, 0.5 * 2 * (f.detach() - prev) / 2)
