"""Neighbourhood discovery in the memory bank (after Huang et al., ICML 2019, "AND").

Every round, each bank row's nearest rows are found through the bank's FAISS mirror
(instret.knn.FeatureIndex: faiss-cpu, FAISS's GPU kernels on a bank tensor where it lies, or
torch); the confident ones become positives of the non-parametric softmax
(losses.neighbourhood_loss). A neighbourhood is stored as a row of ids, -1 where unused:
n x K int64, K the largest neighbourhood (self not included; the loss always adds it).

A round also says whether the collection holds several views of each thing: the share of rows
with a confident neighbour (mutual, and as close as two views of one image), GROUPED or more;
the multi-view check counts only neighbours that are not copies of the same picture.

Rules (TrainConfig.neighbourhoods):
* "anchors" (AND): the share of rows whose neighbour distribution has the lowest entropy
  become anchors, each with its k nearest rows; the share grows round by round (curriculum).
* "mutual": j joins i's neighbourhood when each is among the other's k nearest and their
  cosine is at least the calibrated threshold (what two views of one image reach under the
  training augmentation); the curriculum caps the share of rows given one, most similar first.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from instret.knn import FeatureIndex, drop_self

MAX_COMPONENT = 0.5  # a round whose linked rows would join over half the set is refused
# No round before every image has been seen this often: until then two views of one image are
# not yet much closer than two images, and confident neighbours are everywhere (measured on
# 10,000 CIFAR-10 images: 67 % of rows at epoch 5, 9 % at epoch 20; ETH-80 90 % at epoch 20).
FIRST_ROUND_EPOCH = 20
GROUPED = 0.25  # rows with a confident neighbour that make a collection one of several views a thing
VIEWS_CHECK_IMAGES = 60_000  # images trained on (epochs x rows) before the multi-view check
VIEWS_CHECK_SHARE = 0.3  # the check is made only this early in a run (it may start the run again)
COPY_CHECK_ROWS = 120  # rows with a confident neighbour whose neighbours the check verifies (a sample)
COPY_CHECK_PAIRS = 3  # of each row's confident neighbours, the least similar this many are verified


def views_check_epoch(rows: int) -> int:
    """The epoch after which the multi-view check runs: FIRST_ROUND_EPOCH epochs and
    VIEWS_CHECK_IMAGES images at least. On a folder of unrelated photos (1,500) a quarter of
    the rows still had a confident neighbour at epoch 20 (40 % at k = 5), 7 % at epoch 40;
    ETH-80 (3,280 views of 80 objects) 90 % at 20, 75 % at 40."""
    return max(FIRST_ROUND_EPOCH, math.ceil(VIEWS_CHECK_IMAGES / max(rows, 1)))


def round_epochs(epochs: int, rounds: int, start: float) -> list[int]:
    """The epoch before which each round runs: from start x epochs, evenly up to the last
    fifth of the run, never before FIRST_ROUND_EPOCH; rounds that would fall at or after the
    end are dropped (a run of few epochs has none)."""
    span = 0.8 - start
    due = [max(FIRST_ROUND_EPOCH, round(epochs * (start + span * r / rounds))) for r in range(rounds)]
    return [e for e in due if e < epochs]


def curriculum_share(round_number: int, rounds: int) -> float:
    """Share of the rows given a neighbourhood in round r (1-based): r / rounds, as AND grows it."""
    return min(1.0, round_number / rounds)


@torch.no_grad()
def nearest_rows(
    bank: torch.Tensor, k: int, chunk: int = 8192, in_place: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sims n x k, ids n x k): each bank row's k nearest other rows by cosine, best first,
    searched through the bank's FAISS mirror (in_place: FeatureIndex.sync's); on the bank's device."""
    index = FeatureIndex()
    index.sync(bank, in_place)
    k = min(k, len(bank) - 1)
    sims, ids = [], []
    for start in range(0, len(bank), chunk):
        rows = torch.arange(start, min(start + chunk, len(bank)), device=bank.device)
        s, i = index.search(bank[rows], k + 1)
        s, i = drop_self(s, i.to(rows.device), rows)
        sims.append(s.float())
        ids.append(i.long())
    return torch.cat(sims), torch.cat(ids)


def neighbour_entropy(sims: torch.Tensor, tau: float) -> torch.Tensor:
    """Entropy of each row's softmax over its nearest rows at temperature tau (n): low when a
    few rows stand out, AND's measure of a confident anchor."""
    logp = torch.log_softmax(sims / tau, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def beyond_copies(confident: torch.Tensor, paths: list[str], seed: int, rows: int = COPY_CHECK_ROWS) -> float:
    """Of the rows with a confident neighbour (confident: n x K ids, -1 unused; a seeded sample of
    `rows` of them), the share with one that is not a copy of the same picture (instret.verify,
    strictly; the least similar COPY_CHECK_PAIRS neighbours of each are looked at). A photo and
    its edited copy are confident neighbours too, and a folder of photos and their copies is not
    one of several views of each thing: at epoch 20, 3,925 photos with 500 planted copies had 29 %
    of rows confident and 14 % beyond copies; ETH-80 94 % and 88 %."""
    from instret.verify import verify_pairs

    confident = confident.cpu()
    candidates = torch.nonzero((confident >= 0).any(dim=1)).flatten()
    if len(candidates) == 0:
        return 0.0
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    sample = candidates[order[:rows]].tolist()
    found = {i: [j for j in confident[i].tolist() if j >= 0] for i in sample}
    # The least similar neighbour first, the likeliest to be another view: most rows are then
    # decided by one pair, and only the rest have their next ones verified (a pair takes about
    # 0.1 s of a core).
    several: set[int] = set()
    later = [(i, j) for i, js in found.items() for j in js[-COPY_CHECK_PAIRS:-1]]
    for pairs in ([(i, js[-1]) for i, js in found.items()], later):
        pairs = [(i, j) for i, j in pairs if i not in several]
        verdicts = verify_pairs([(paths[i], paths[j], True) for i, j in pairs])
        several.update(i for (i, _), verdict in zip(pairs, verdicts) if not verdict.copy)
    return len(several) / len(sample)


def anchor_neighbourhoods(sims: torch.Tensor, ids: torch.Tensor, share: float, k: int, tau: float) -> torch.Tensor:
    """AND: the lowest-entropy `share` of rows keep their k nearest rows; the rest none (n x k)."""
    n = len(ids)
    chosen = neighbour_entropy(sims, tau).argsort()[: round(share * n)]
    out = torch.full((n, k), -1, dtype=torch.long, device=ids.device)
    out[chosen] = ids[chosen, :k]
    return out


def mutual_neighbourhoods(
    sims: torch.Tensor, ids: torch.Tensor, k: int, threshold: float, share: float = 1.0, chunk: int = 65536
) -> torch.Tensor:
    """Neighbours that are mutual within each other's k nearest and at cosine >= threshold
    (n x k, -1 padded, best first): the confident ones; only the `share` of rows whose best
    such neighbour is the most similar keep theirs."""
    n = len(ids)
    s, j = sims[:, :k], ids[:, :k]
    # i is among j's k nearest: look for i in row j (chunked: n x k x k ids at once is large).
    back = torch.empty_like(j, dtype=torch.bool)  # n x k
    for a in range(0, n, chunk):
        rows = torch.arange(a, min(a + chunk, n), device=ids.device)
        back[a : a + chunk] = (ids[j[a : a + chunk], :k] == rows.view(-1, 1, 1)).any(dim=2)
    keep = back & (s >= threshold)
    out = torch.where(keep, j, torch.full_like(j, -1))
    best = torch.where(keep, s, torch.full_like(s, -math.inf)).max(dim=1).values
    allowed = round(share * n)
    if int(keep.any(dim=1).sum()) > allowed:
        out[best.argsort(descending=True)[allowed:]] = -1
    return _compact(out)


def _compact(neighbourhoods: torch.Tensor) -> torch.Tensor:
    """Used ids moved to the front of each row (order kept), columns nobody uses dropped."""
    used = neighbourhoods >= 0
    order = (~used).to(torch.int8).argsort(dim=1, stable=True)
    packed = neighbourhoods.gather(1, order)
    width = int(used.sum(dim=1).max()) if len(neighbourhoods) else 0
    return packed[:, : max(width, 1)]


def components(neighbourhoods: torch.Tensor) -> np.ndarray:
    """Connected components of the graph linking each row to its neighbours: a component
    label per row (numpy, n)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nb = neighbourhoods.cpu().numpy()
    rows, cols = np.nonzero(nb >= 0)
    n = len(nb)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, nb[rows, cols])), shape=(n, n))
    return connected_components(graph, directed=True, connection="weak")[1]


def pair_codes(neighbourhoods: torch.Tensor) -> np.ndarray:
    """The neighbour pairs {i, j} of a round, each as one sorted int64 code min * n + max."""
    nb = neighbourhoods.cpu().numpy()
    rows, cols = np.nonzero(nb >= 0)
    a, b = rows.astype(np.int64), nb[rows, cols].astype(np.int64)
    return np.unique(np.minimum(a, b) * len(nb) + np.maximum(a, b))


def round_figures(neighbourhoods: torch.Tensor, previous: torch.Tensor | None) -> dict:
    """What the monitor reports of a round: rows given neighbours, their mean size (self
    included), the largest linked component's share of the set, and agreement with the
    previous round (the share of its neighbour pairs this round keeps; 1 for the first)."""
    n = len(neighbourhoods)
    sizes = (neighbourhoods >= 0).sum(dim=1)
    has = sizes > 0
    labels = components(neighbourhoods)
    largest = int(np.bincount(labels).max()) if n else 0
    before = pair_codes(previous) if previous is not None else np.empty(0, np.int64)
    agreement = float(np.isin(before, pair_codes(neighbourhoods)).mean()) if len(before) else 1.0
    return {
        "neighbourhood_rows": int(has.sum()),
        "neighbourhood_size": float((sizes[has] + 1).float().mean()) if bool(has.any()) else 1.0,
        "neighbourhood_largest": largest / max(n, 1),
        "neighbourhood_agreement": agreement,
    }
