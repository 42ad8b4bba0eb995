"""Several processes training one run (torchrun): who am I, the collectives the trainer needs,
and BatchNorm over the global batch.

Every process holds the whole dataset, the whole memory bank and the same random generator,
so all of them draw the same permutation, the same augmentation parameters and the same NCE
noise for the global batch; each encodes its own contiguous slice of the batch. Features are
then gathered in rank order, so every process applies the same bank update as one process
with the whole batch would: the banks never drift apart, and the result does not depend on
the number of processes beyond float rounding.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from instret.process_rank import local_rank, rank, world_size


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that writes files and logs (rank 0)."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This process's contiguous slice of a global batch of n (sizes differ by at most one)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


SINGLE = World()


def world_from_env() -> World:
    """The World torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (one process without them)."""
    if world_size() <= 1:
        return SINGLE
    return World(rank(), world_size(), local_rank())


# How long a process waits in a collective or at the close. The others wait at the close while rank 0
# evaluates, exports and indexes alone, which takes far longer than NCCL's default 10 minutes at
# ImageNet scale; a real hang still ends, after this.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


@contextlib.contextmanager
def process_group(world: World, device: torch.device):
    """Joined to the other processes inside the block: NCCL between GPUs, gloo on CPUs.

    On a normal exit every process waits for the others before the group is torn down: a
    process that tears down while another still talks to it aborts that one (gloo's
    "terminate called without an active exception"). After an error it does not wait, since
    the others may never arrive; the launcher stops them."""
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
        if world.distributed:
            _wait_for_every_process(world)
    finally:
        if world.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _wait_for_every_process(world: World) -> None:
    """Return once every process has got here, through the group's key-value store rather than
    a collective. A barrier is itself a collective: the first process out of it could tear the
    group down while another was still finishing it (seen in CI, once in many runs). Once a
    process has seen every mark in the store, none is inside a collective any more."""
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store: not torn down with the group
    store.set(f"instret/closing/{world.rank}", "1")
    store.wait([f"instret/closing/{r}" for r in range(world.size)], COLLECTIVE_TIMEOUT)


def gather_rows(world: World, local: torch.Tensor, n: int) -> torch.Tensor:
    """The n x ... global tensor from each process's slice (world.rows order), on every process."""
    if not world.distributed:
        return local
    width = -(-n // world.size)  # slices differ by at most one row: pad to the largest
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded.contiguous())
    sizes = [World(r, world.size).rows(n) for r in range(world.size)]
    return torch.cat([p[: s.stop - s.start] for p, s in zip(parts, sizes)])


def all_sum(world: World, x: torch.Tensor) -> torch.Tensor:
    if world.distributed:
        x = x.clone()
        dist.all_reduce(x)
    return x


def broadcast_object(world: World, obj):
    """Rank 0's value of obj on every process (e.g. a run folder name chosen by the clock)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_lists(world: World, items: list) -> list:
    """Every process's list joined in rank order, on every process."""
    if not world.distributed:
        return items
    parts = [None] * world.size
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch across processes.

    torch's SyncBatchNorm runs on GPUs only; this one runs wherever all_reduce does (gloo on
    CPUs too). The sums travel through torch.distributed.nn's all_reduce, which carries
    gradients back across processes, so the backward pass is that of one big batch. Under
    no_grad (BatchNorm re-estimation, evaluation) each process keeps to its own images.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled() and dist.is_initialized()):
            return super().forward(x)
        dims = [0, 2, 3]
        c = x.shape[1]
        xf = x.float()
        count = xf.new_full((1,), x.numel() / c)  # filled on the device: no copy from the host
        sums = _global_sum(torch.cat([xf.sum(dims), count]))
        n = sums[c]
        mean = sums[:c] / n
        # Two passes, as BatchNorm itself computes it: E[(x - mean)^2], not E[x^2] - mean^2.
        var = _global_sum((xf - mean.view(1, c, 1, 1)).pow(2).sum(dims)) / n
        with torch.no_grad():  # running statistics as nn.BatchNorm keeps them (unbiased variance)
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)  # no host sync
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        return (y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)).to(x.dtype)


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    """all_reduce that carries the gradient back to every process (torch.distributed.nn's)."""
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        # Deprecated in favour of functional collectives, which carry no gradient back.
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)


def global_batch_norm(model: nn.Module) -> nn.Module:
    """The model with every BatchNorm2d replaced by GlobalBatchNorm (weights and buffers kept)."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            global_batch_norm(child)
    return model
