"""Which torch device a `--device` option names (auto, cpu, cuda, cuda:N), checked."""

from __future__ import annotations

import functools

import torch

from instret.errors import InstretError


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise InstretError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InstretError(f"--device {spec}: no CUDA GPU is available here (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InstretError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) present")
    elif device.type != "cpu":
        raise InstretError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    return device


@functools.cache  # a fact of the machine: asked of the kernel once per process
def fast_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (Intel AMX): bf16 autocast then speeds up a
    CPU training step (benchmarks/train_throughput.py: 1.2x for small, 2.1x for ResNet-18 on 2
    cores). Elsewhere oneDNN emulates bf16, which is slower than float32."""
    init_amx = getattr(torch._C._cpu, "_init_amx", None)  # asks the kernel for the AMX tiles
    try:
        return bool(init_amx and init_amx())
    except RuntimeError:
        return False
