"""Time of one neighbourhood round (instret.neighbours) on banks of 50,000 and 1,280,000 rows.

    python benchmarks/neighbour_rounds.py [--rows 50000,1280000] [--dim 128] [--k 10] [--sample 20000]

A round is: search every bank row's k nearest rows through the bank's FAISS mirror
(neighbours.nearest_rows: faiss-cpu here, FAISS's GPU kernels or torch on a CUDA bank), choose
the neighbourhoods (the mutual rule and AND's anchors), and the monitor's figures
(components, agreement with the previous round). The bank is random unit rows, which costs a
search what a trained one does. Where a bank has more rows than --sample, the search is timed
for --sample of them against the whole bank and scaled to every row (stated as "extrapolated");
the selection and the figures always run on every row. --device cuda runs the search where a
CUDA bank lies. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from instret import neighbours
from instret.knn import FeatureIndex


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def one_round(n: int, dim: int, k: int, sample: int, device: str) -> dict:
    g = torch.Generator().manual_seed(n)
    bank = F.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)
    if n <= sample:
        (sims, ids), search = timed(lambda: neighbours.nearest_rows(bank, k))
        engine, searched = None, n
    else:
        index = FeatureIndex()
        _, sync = timed(lambda: index.sync(bank))
        _, part = timed(lambda: index.search(bank[:sample], k + 1))
        engine, searched = index.engine, sample
        search = sync + part * n / sample
        # Neighbours for the rest of the timing: the rows' own nearest are not needed to time
        # the selection, only their shape (random ids, sorted similarities).
        ids = torch.randint(0, n, (n, k), generator=g).to(device)
        sims = torch.rand(n, k, generator=g).sort(dim=1, descending=True).values.to(device)
    if engine is None:
        index = FeatureIndex()
        index.sync(bank[:2])
        index.search(bank[:1], 1)
        engine = index.engine
    mutual, t_mutual = timed(lambda: neighbours.mutual_neighbourhoods(sims, ids, k, threshold=0.0))
    anchors, t_anchors = timed(lambda: neighbours.anchor_neighbourhoods(sims, ids, 0.5, 1, 0.1))
    _, t_figures = timed(lambda: neighbours.round_figures(mutual, anchors))
    return {
        "rows": n,
        "engine": engine,
        "search_s": round(search, 2),
        "search": "measured" if searched == n else f"extrapolated from {searched:,} rows",
        "mutual_s": round(t_mutual, 3),
        "anchors_s": round(t_anchors, 3),
        "figures_s": round(t_figures, 3),
        "round_s": round(search + t_mutual + t_figures, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="50000,1280000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--sample", type=int, default=20000, help="rows searched where a bank has more")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    results = []
    for n in map(int, args.rows.split(",")):
        r = one_round(n, args.dim, args.k, args.sample, args.device)
        print(
            f"{n:>9,} rows on {args.device} ({r['engine']}): search {r['search_s']:.2f} s ({r['search']}), mutual "
            f"{r['mutual_s']:.3f} s, anchors {r['anchors_s']:.3f} s, figures {r['figures_s']:.3f} s; round {r['round_s']:.2f} s",
            flush=True,
        )
        results.append(r)
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "k": args.k, "rounds": results}))


if __name__ == "__main__":
    main()
