"""Weighted kNN (docs/method.md, "Judging the features") over a FAISS view of a feature table.

The vote is one pure function of neighbour similarities and labels; the search that finds
the neighbours is separate (FeatureIndex): FAISS on the CPU, and for a bank on the GPU a
search where it lies, by FAISS's GPU kernels (faiss-gpu) or a chunked torch matmul.
"""

from __future__ import annotations

import torch

from instret.faiss_boundary import GPU_MAX_K, faiss_gpu_count, flat_index, host_rows, knn_on_gpu


def knn_vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, sigma: float) -> torch.Tensor:
    """Class scores Q x C: sum over the k neighbours of exp(s / sigma), per neighbour label."""
    weights = torch.exp(sims / sigma)  # Q x k
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device, dtype=weights.dtype)
    return scores.scatter_add_(1, neighbour_labels, weights)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # Q x k
    hits = ranked == labels.view(-1, 1)
    return {k: float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def torch_search(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 1024):
    """Exact inner-product top-k by chunked matmul: (sims Q x k, ids Q x k)."""
    sims, ids = [], []
    for start in range(0, len(queries), chunk):
        s, i = (queries[start : start + chunk] @ keys.T).topk(k, dim=1)  # c x D @ D x n -> c x n -> c x k
        sims.append(s)
        ids.append(i)
    return torch.cat(sims), torch.cat(ids)


class FeatureIndex:
    """A searchable view of an n x D feature table (e.g. the memory bank).

    `sync(table)` refreshes the view; `search(queries, k)` returns torch (sims, ids) on the
    queries' device. A table on the CPU is copied into a FAISS Flat index. A CUDA table is
    searched where it lies, never copied to the host: by FAISS's GPU brute force when faiss-gpu
    is installed and k is within its limit, else by a chunked torch matmul. `engine` says which
    served the last search ("faiss-cpu", "faiss-gpu" or "torch").
    """

    def __init__(self):
        self._index = None
        self._table = None  # the tensor searched in place
        self._faiss_gpu = False  # whether FAISS's GPU kernels search it
        self.engine = None

    def sync(self, table: torch.Tensor, in_place: bool | None = None) -> None:
        """in_place: search the tensor itself (default: when it is on a GPU)."""
        if table.is_cuda if in_place is None else in_place:
            self._table, self._index, self._faiss_gpu = table, None, faiss_gpu_count() > 0
            return
        self._table, self._index = None, flat_index(host_rows(table))

    @property
    def ntotal(self) -> int:
        return self._index.ntotal if self._index is not None else len(self._table)

    def search(self, queries: torch.Tensor, k: int):
        k = min(k, self.ntotal)
        if self._index is None:
            if k <= GPU_MAX_K and self._faiss_gpu:
                self.engine = "faiss-gpu"
                sims, ids = knn_on_gpu(queries, self._table, k)
                return sims.to(queries.device), ids.to(queries.device)
            self.engine = "torch"
            return torch_search(queries.to(self._table.dtype), self._table, k)
        self.engine = "faiss-cpu"
        sims, ids = self._index.search(host_rows(queries), k)
        return torch.from_numpy(sims).to(queries.device), torch.from_numpy(ids).to(queries.device)


def drop_self(sims: torch.Tensor, ids: torch.Tensor, query_ids: torch.Tensor):
    """From k+1 neighbours, keep k that are not the query itself (leave-one-out)."""
    is_self = ids == query_ids.view(-1, 1)
    keep = ~is_self
    keep[:, -1] &= is_self.any(dim=1)  # rows without self lose their last neighbour instead
    k = ids.shape[1] - 1
    return sims[keep].view(-1, k), ids[keep].view(-1, k)


def knn_class_scores(
    index: FeatureIndex,
    key_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 200,
    sigma: float = 0.1,
    leave_one_out: bool = False,
    chunk: int = 4096,
    key_rows: torch.Tensor | None = None,
):
    """Each query's weighted vote per class, chunk by chunk: yields (first query row, chunk x
    num_classes scores). leave_one_out: the queries are keys themselves and each excludes
    itself; key_rows: the key row of each query (default: query i is key i)."""
    key_labels = key_labels.to(queries.device)
    k = min(k, index.ntotal - (1 if leave_one_out else 0))
    if leave_one_out and key_rows is None:
        key_rows = torch.arange(len(queries))
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk]
        if leave_one_out:
            sims, ids = index.search(q, k + 1)
            sims, ids = drop_self(sims, ids, key_rows[start : start + len(q)].to(q.device))
        else:
            sims, ids = index.search(q, k)
        yield start, knn_vote(sims.float(), key_labels[ids], num_classes, sigma)


def knn_evaluate(
    index: FeatureIndex,
    key_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    **vote,
) -> dict[str, float]:
    """Weighted kNN top-1/top-5 of queries against the indexed keys; vote: knn_class_scores's
    k, sigma, leave_one_out, chunk and key_rows."""
    hits = {1: 0.0, 5: 0.0}
    for start, scores in knn_class_scores(index, key_labels, queries, num_classes, **vote):
        for kk, acc in topk_accuracy(scores, query_labels[start : start + len(scores)].to(scores.device)).items():
            hits[kk] += acc * len(scores)
    return {"knn_top1": hits[1] / len(queries), "knn_top5": hits[5] / len(queries)}
