"""The one way benchmarks time repeated steps: warm-up steps first (thread pools, allocator,
loader workers), then the mean wall time of the measured ones."""

from __future__ import annotations

import time


def seconds_per_step(step, steps: int, warmup: int = 2) -> float:
    """Call step(i) for i = 0 .. warmup + steps - 1; the mean seconds of the last `steps` calls."""
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    return (time.perf_counter() - start) / steps
