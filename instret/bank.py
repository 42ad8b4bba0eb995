"""The memory bank: one unit-norm feature per training image, updated explicitly after each step."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MemoryBank:
    """A plain n x dim buffer. `update` is no-grad and touches only the given rows."""

    def __init__(self, n: int, dim: int, device="cpu", generator: torch.Generator | None = None):
        # Uniform on the unit sphere: normalised Gaussian rows.
        self.features = F.normalize(torch.randn(n, dim, device=device, generator=generator), dim=1)

    def __len__(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor, momentum: float) -> None:
        """v_i <- normalise(momentum * v_i + (1 - momentum) * f_i) for each i in indices (unique)."""
        mixed = self.features[indices].mul(momentum).add_(features.detach().to(self.features.dtype), alpha=1 - momentum)
        self.features.index_copy_(0, indices, F.normalize(mixed, dim=1))

    def state_dict(self) -> dict:
        return {"features": self.features}

    def load_state_dict(self, state: dict) -> None:
        if state["features"].shape != self.features.shape:
            raise ValueError(f"bank shape {tuple(state['features'].shape)} != {tuple(self.features.shape)}")
        self.features.copy_(state["features"])
