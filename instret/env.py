"""What this machine offers instret: versions, and the GPUs torch and FAISS see (`instret env`).

Versions come from the installed packages' metadata, so that the command answers in a fraction
of a second. torch is imported (about 2-3 s) only where an NVIDIA device exists to ask about:
without /dev/nvidiactl no build of torch can see a GPU.
"""

from __future__ import annotations

import glob
import os
import platform
from importlib import metadata


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def usable_cpus() -> int:
    """The cores this process may run on (its affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _faiss() -> tuple[str | None, str | None, int]:
    """(version, build: the package that installed it, GPUs it sees)."""
    from instret.faiss_boundary import faiss_gpu_count

    try:
        import faiss
    except ImportError:
        return None, None, 0
    build = next((p for p in ("faiss-gpu-cuvs", "faiss-gpu-cu12", "faiss-gpu", "faiss-cpu") if _version(p)), None)
    return faiss.__version__, build, faiss_gpu_count()


def _torch_gpus() -> tuple[bool, list[str], str | None]:
    """(torch sees CUDA, the device names, the CUDA version torch was built for)."""
    if not os.path.exists("/dev/nvidiactl") and not glob.glob("/dev/nvidia[0-9]*"):
        return False, [], None
    import torch

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return torch.cuda.is_available(), names, torch.version.cuda


def environment() -> dict:
    faiss_version, faiss_build, faiss_gpus = _faiss()
    torch_cuda, gpu_names, cuda_version = _torch_gpus()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "faiss": faiss_version,
        "faiss_build": faiss_build,
        "faiss_gpus": faiss_gpus,
        "torch_cuda": torch_cuda,
        "torch_cuda_version": cuda_version,
        "torch_gpus": len(gpu_names),
        "gpu_names": gpu_names,
        "cpus": usable_cpus(),
    }
