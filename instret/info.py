"""What an index holds, and what this machine offers (`instret info`, `instret env`)."""

from __future__ import annotations

import platform
from pathlib import Path

from instret.index import SearchIndex


def index_info(index_dir: str | Path) -> dict:
    index = SearchIndex(index_dir)
    m = index.manifest
    sizes = {p.name: p.stat().st_size for p in sorted(index.gen_dir.iterdir()) if p.is_file()}
    total = sum(p.stat().st_size for p in index.dir.rglob("*") if p.is_file())
    skipped = index.skipped()
    return {
        "index": str(index.dir), "generation": index.generation, "vectors": m["count"], "dim": m["dim"],
        "metric": m.get("metric"), "index_type": m["factory"], "encoder_fingerprint": m["encoder_fingerprint"],
        "encoder_arch": m.get("encoder_arch"), "image_size": m.get("image_size"), "root": m["root"],
        "updated": m.get("updated"), "skipped": len(skipped), "skipped_files": [{"path": p, "reason": r} for p, r in skipped],
        "bytes": sizes, "bytes_total": total,
    }  # fmt: skip


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
