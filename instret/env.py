"""What this machine offers instret: versions, and the GPUs torch and FAISS see (`instret env`)."""

from __future__ import annotations

import platform


def environment() -> dict:
    import numpy
    import torch
    import torchvision

    from instret.knn import faiss_gpu_count

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "faiss": faiss_version,
        "faiss_gpus": faiss_gpu_count(),
        "torch_cuda": torch.cuda.is_available(),
        "torch_gpus": torch.cuda.device_count(),
        "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }
