"""Which process of a torchrun job this is, read from torchrun's environment in one place.

Free of torch, so that logging and the command line's error path can ask without importing it;
instret.distributed.World is built from the same three numbers.
"""

from __future__ import annotations

import os


def rank() -> int:
    """This process's rank in the job (0 alone)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """The rank among the processes on this machine (the GPU it uses)."""
    return int(os.environ.get("LOCAL_RANK", "0"))
