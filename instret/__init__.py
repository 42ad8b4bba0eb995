"""instret: Instance Discrimination (Wu et al., CVPR 2018) and instance-level image search."""

from instret.config import TrainConfig
from instret.encoder import load_encoder
from instret.errors import InstretError


def train(options, resume: bool = False) -> dict:
    """Train or resume a run (see instret.train.train)."""
    from instret.train import train as _train

    return _train(options, resume=resume)


__all__ = ["InstretError", "TrainConfig", "load_encoder", "train"]
