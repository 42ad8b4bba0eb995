"""What this machine offers instret: versions, and the GPUs torch and FAISS see (`instret env`).

Versions come from the installed packages' metadata, so that the command answers in a fraction
of a second. torch is imported (about 2-3 s) only where an NVIDIA device exists to ask about:
without /dev/nvidiactl no build of torch can see a GPU.
"""

from __future__ import annotations

import glob
import os
import platform
import re
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
    from instret.faiss_boundary import faiss_gpu_count, faiss_version

    version = faiss_version()
    if version is None:
        return None, None, 0
    build = next((p for p in ("faiss-gpu-cuvs", "faiss-gpu-cu12", "faiss-gpu", "faiss-cpu") if _version(p)), None)
    return version, build, faiss_gpu_count()


def cuda_major(package: str | None) -> str | None:
    """The CUDA major version a package's wheel was built against, read from the CUDA packages
    it requires (`nvidia-...-cu12`, `cuda-toolkit[...]==13.0.3`); None for one without CUDA."""
    if package is None or _version(package) is None:
        return None
    for requirement in metadata.requires(package) or []:
        suffix = re.match(r"nvidia-[\w-]+?-cu(\d+)\b", requirement)
        toolkit = re.match(r"(?:cuda-toolkit|nvidia-cuda-runtime)\b[^=<>~;]*[=<>~]=?\s*(\d+)", requirement)
        if suffix or toolkit:
            return (suffix or toolkit).group(1)
    return None


def side_by_side(faiss_build: str | None, faiss_cuda: str | None, torch_cuda: str | None) -> str:
    """Whether FAISS and torch share one CUDA stack in a process, in words."""
    if faiss_build is None:
        return "no FAISS installed"
    if faiss_cuda is None:
        return f"yes: {faiss_build} uses no CUDA"
    if torch_cuda is None:
        return f"FAISS on CUDA {faiss_cuda}; this torch has no CUDA"
    if faiss_cuda == torch_cuda:
        return f"yes: one CUDA {torch_cuda} stack for both"
    return (
        f"two CUDA stacks in one process (FAISS on CUDA {faiss_cuda}, torch on CUDA {torch_cuda}): separate"
        " libraries that load side by side, each with its own GPU memory pool"
    )


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
    faiss_cuda, torch_cuda_build = cuda_major(faiss_build), cuda_major("torch")
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
        "faiss_cuda_build": faiss_cuda,
        "torch_cuda_build": torch_cuda_build,
        "side_by_side": side_by_side(faiss_build, faiss_cuda, torch_cuda_build),
        "gpu_names": gpu_names,
        "cpus": usable_cpus(),
    }
