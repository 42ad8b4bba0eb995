"""Every FAISS call of instret: the rows FAISS takes from torch or numpy, the GPUs it sees, its
GPU resources, copies of an index onto GPUs, brute-force kNN on CUDA tensors where they lie,
and the search index's layouts (a factory string checked, built, trained, tuned, read, written).

Both the training monitor (instret.knn) and the search index (instret.index) go through here.
torch is imported only by the functions that take tensors, so that `instret info` starts
without it. FAISS's GPU kernels refuse k (and nprobe) above GPU_MAX_K.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from instret.defaults import EF_SEARCH, NPROBE
from instret.errors import InstretError
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


def faiss_version() -> str | None:
    """The installed FAISS's version; None without one."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss.__version__


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


# --- the search index's layouts -------------------------------------------------------

TRAIN_SAMPLE = 100_000  # vectors used to train IVF / PQ layouts


def check_factory(factory: str, dim: int, count: int) -> None:
    """Refuse an index type FAISS cannot build for `count` vectors of `dim`, before any image is
    read: the string is parsed, and a layout that needs training is trained on random vectors
    of that number (up to 10,000; beyond, the string alone is checked). Nothing is added."""
    index = _layout(factory, dim)
    if not index.is_trained and count <= 10_000:
        _train(index, normalise(np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)), factory)


def make_faiss_index(vectors: np.ndarray, ids: np.ndarray, factory: str, seed: int = 0):
    """A FAISS index of `factory` layout over the vectors, with the given ids."""
    import faiss

    index = faiss.IndexIDMap2(trained_layout(factory, vectors, seed))
    if len(vectors):
        index.add_with_ids(vectors, ids.astype(np.int64))
    return index


def trained_layout(factory: str, vectors: np.ndarray, seed: int = 0):
    """The empty `factory` layout, trained (where it needs training) on a seeded sample of up to
    TRAIN_SAMPLE of the vectors (an array or a memory map)."""
    index = _layout(factory, vectors.shape[1] if vectors.ndim == 2 else 0)
    if not index.is_trained:
        _train(index, vectors, factory, seed)
    return index


def _layout(factory: str, dim: int):
    """The empty, untrained FAISS index a factory string describes."""
    import faiss

    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise InstretError(
            f"--index-type {factory!r} is not a FAISS factory string FAISS accepts: {str(e).strip().splitlines()[-1]}"
        ) from None


def _train(index, vectors: np.ndarray, factory: str, seed: int = 0) -> None:
    """Train a layout on a sample of up to TRAIN_SAMPLE of the vectors."""
    if len(vectors) == 0:
        raise InstretError(f"--index-type {factory!r} needs training vectors, and there are none")
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(len(vectors), min(len(vectors), TRAIN_SAMPLE), replace=False)]
    try:
        index.train(sample)
    except RuntimeError as e:
        raise InstretError(
            f"--index-type {factory!r} could not be trained on {len(sample)} vectors: {str(e).strip().splitlines()[-1]}"
        ) from None


def set_search_breadth(index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """nprobe (IVF) and efSearch (HNSW) where the layout has them; others are left alone."""
    import faiss

    space = faiss.ParameterSpace()
    for name, value in (("nprobe", nprobe or NPROBE), ("efSearch", ef_search or EF_SEARCH)):
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            pass  # not a parameter of this layout (Flat has neither)


# --- inverted lists on disk (instret.ondisk) --------------------------------------------

LISTS = "lists.ivfdata"  # the on-disk inverted lists, beside the index.faiss that points to them


def fills_lists_on_disk(factory: str, dim: int) -> bool:
    """Whether the layout has inverted lists FAISS can keep on disk (IVF, but not IVFPQR)."""
    import faiss

    try:
        faiss.extract_index_ivf(_layout(factory, dim))
    except (RuntimeError, InstretError):
        return False
    return "IVFPQR" not in factory.upper()


def merge_lists_on_disk(trained, part_files: list[Path], index_file: Path) -> None:
    """Write index_file: the empty trained layout holding the inverted lists of every part (the
    same layout, each filled with other vectors), merged into LISTS beside it. Only one list of
    one part at a time is read: the parts are memory-mapped."""
    from faiss.contrib.ondisk import merge_ondisk

    with native_stdout_silenced():
        merge_ondisk(trained, [str(p) for p in part_files], str(index_file.parent / LISTS))
        write_index(trained, index_file)


@contextmanager
def native_stdout_silenced():
    """FAISS's on-disk lists print to the C stdout, which carries instret's JSON: point the
    process's descriptor 1 at /dev/null for the call (C buffers flushed before it comes back)."""
    import ctypes

    with _STDOUT_SWAP:
        sys.stdout.flush()
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            yield
        finally:
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
            os.close(null)


_STDOUT_SWAP = threading.Lock()


def read_index(path: Path):
    """A generation's index.faiss, memory-mapped where the layout allows; with LISTS beside it,
    the lists it names are read from there (the folder may have moved since it was written)."""
    import faiss

    lists = path.parent / LISTS
    if lists.exists():
        try:
            with native_stdout_silenced():
                index = faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR)
        except RuntimeError:
            raise InstretError(f"{path}: FAISS index or its {LISTS} unreadable (truncated or corrupted?)") from None
        # A search reading past the end of a short file would kill the process (SIGBUS).
        if faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).totsize > lists.stat().st_size:
            raise InstretError(f"{lists}: shorter than its index says (truncated?); the index is damaged, rebuild it")
        return index
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        try:
            return faiss.read_index(str(path))
        except RuntimeError:
            raise InstretError(f"{path}: FAISS index unreadable (truncated or corrupted?)") from None


def write_index(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))
