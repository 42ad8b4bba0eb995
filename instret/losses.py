"""Instance discrimination losses as pure functions of tensors (docs/method.md, "The loss").

Shapes: B the batch, D the feature dimension, n the bank size, m the NCE noise samples.
Each returns the mean over the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def softmax_loss(f: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, tau: float) -> torch.Tensor:
    """Exact non-parametric softmax: -log P(i | f_i), P over all n bank rows."""
    logits = (f / tau) @ bank.T  # B x D @ D x n -> B x n; dividing f, not the B x n logits, is cheaper
    return F.cross_entropy(logits, idx)


def nce_noise(bank_size: int, batch: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise rows for a whole (global) batch, B x m, from the run's generator: every
    process draws the same, then takes its own rows."""
    return torch.randint(0, bank_size, (batch, m), generator=generator, device=generator.device)


def estimate_nce_z(f: torch.Tensor, bank: torch.Tensor, noise: torch.Tensor, tau: float, total=lambda t: t) -> float:
    """Monte-Carlo normaliser Z ~= n * mean_j exp(v_j . f / tau) over the noise rows of a batch.
    total: sums a tensor over the processes (instret.distributed.all_sum), so that Z is the
    global batch's estimate; the identity in one process. The paper estimates Z once, from the
    first batch, and keeps it."""
    sims = torch.einsum("bd,bmd->bm", f.detach(), bank[noise])  # B x m
    sums = torch.stack([torch.exp(sims / tau).sum(), sims.new_tensor(float(sims.numel()))])
    exp_sum, count = total(sums).tolist()
    return bank.shape[0] * exp_sum / count


def nce_loss(
    f: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, noise: torch.Tensor, tau: float, z: float
) -> torch.Tensor:
    """NCE with uniform noise P_n = 1/n: -log h(i, f) - sum_k log(1 - h(j_k, f)).

    h = P / (P + m P_n) = sigmoid(log P - log(m / n)), computed in log space for stability.
    """
    n, m = bank.shape[0], noise.shape[1]
    pos = (f * bank[idx]).sum(dim=1)  # B
    neg = torch.einsum("bd,bmd->bm", f, bank[noise])  # B x D, B x m x D -> B x m
    shift = math.log(z) + math.log(m / n)
    return (F.softplus(shift - pos / tau) + F.softplus(neg / tau - shift).sum(dim=1)).mean()


def proximal_term(f: torch.Tensor, previous: torch.Tensor, lam: float) -> torch.Tensor:
    """lambda * ||v_i(t) - v_i(t-1)||^2, previous = the bank rows from the last visit (B x D)."""
    return lam * (f - previous.detach()).pow(2).sum(dim=1).mean()


def neighbourhood_loss(
    f: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, neighbours: torch.Tensor, tau: float
) -> torch.Tensor:
    """-log sum_{j in {i} + N(i)} P(j | f_i): the softmax's mass on the sample's own row and its
    neighbourhood (Huang et al. 2019); neighbours B x K bank ids, -1 where unused."""
    logits = (f / tau) @ bank.T  # B x D @ D x n -> B x n
    ids = torch.cat([idx.view(-1, 1), neighbours], dim=1)  # B x (K + 1)
    mine = logits.gather(1, ids.clamp_min(0)).masked_fill(ids < 0, -math.inf)
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(mine, dim=1)).mean()
