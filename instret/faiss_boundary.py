"""Every crossing between torch or numpy and FAISS: the rows FAISS takes, the GPUs it sees, its
GPU resources, copies of an index onto GPUs, and brute-force kNN on CUDA tensors where they lie.

Both the training monitor (instret.knn) and the search index (instret.index) go through here.
torch is imported only by the functions that take tensors, so that `instret info` starts
without it. FAISS's GPU kernels refuse k (and nprobe) above GPU_MAX_K.
"""

from __future__ import annotations

import functools

import numpy as np

from instret.postprocess import normalise

GPU_MAX_K = 2048


def as_float32(x) -> np.ndarray:
    """Contiguous float32 rows, L2-normalised: what every FAISS call of the search index takes
    (from numpy or torch, on any device)."""
    return normalise(host_rows(x) if hasattr(x, "detach") else x)


def host_rows(table) -> np.ndarray:
    """A tensor's rows as contiguous float32 on the host, as they are (not re-normalised)."""
    return np.ascontiguousarray(table.detach().float().cpu().numpy())


def flat_index(rows: np.ndarray):
    """An exact inner-product FAISS index over contiguous float32 rows (host_rows), as they are."""
    import faiss

    index = faiss.IndexFlatIP(rows.shape[1])
    index.add(rows)
    return index


def faiss_gpu_count() -> int:
    """GPUs faiss can use; 0 for faiss-cpu (which has no get_num_gpus, or raises on cloning)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@functools.cache
def gpu_resources(device: int):
    """One StandardGpuResources per GPU and process: each holds about 1.5 GiB of scratch memory,
    so making one per search (or per epoch) would fill the GPU."""
    import faiss

    return faiss.StandardGpuResources()


def to_gpus(index):
    """A copy of a CPU index on every GPU faiss sees, its vectors split across them (sharded)
    rather than copied to each."""
    import faiss

    options = faiss.GpuMultipleClonerOptions()
    options.shard = faiss_gpu_count() > 1
    return faiss.index_cpu_to_all_gpus(index, options)


def knn_on_gpu(queries, keys, k: int):
    """(sims, ids) of the k keys with the largest inner product with each query, searched by
    FAISS's GPU brute force on the keys tensor where it lies (no copy, torch's current stream);
    queries are moved to the keys' device and dtype (float32 unless the keys are float16)."""
    import faiss
    import faiss.contrib.torch_utils
    import torch

    if k > GPU_MAX_K:
        raise ValueError(f"FAISS GPU search takes k <= {GPU_MAX_K}, not {k}")
    dtype = keys.dtype if keys.dtype in (torch.float32, torch.float16) else torch.float32
    device = keys.device.index if keys.device.index is not None else 0
    q = queries.detach().to(device=keys.device, dtype=dtype).contiguous()
    x = keys.detach().to(dtype).contiguous()
    return faiss.knn_gpu(gpu_resources(device), q, x, k, metric=faiss.METRIC_INNER_PRODUCT, device=device)
