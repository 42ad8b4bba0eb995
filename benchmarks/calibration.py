"""Calibration: the unrelated pairs an index predicts against those it holds, on folders of random photos.

    python benchmarks/calibration.py [--sizes 300,3925] [--minutes 2,15] [--seed 0] [--shared DIR]

For each size, that many Imagenette val photos (no planted copies, so every pair of distinct
files is unrelated, Imagenette's own bursts of one scene included) are trained on for the
matching `--minutes` (the run indexes them at the defaults). Every pair's score is then computed exactly
and, at the thresholds where 1, 3, 10, ... 1000 pairs score at least as high, the count the
index's calibration predicts (pairs x its unrelated share, instret.calibration) is printed
beside the count observed, with their ratio. Last, `instret dups` at its default on the same
folder: every pair it reports is a false one here (with and without verification). The last
stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from dups import SHARED, build_collection, group_pairs, say

COUNTS = (1, 3, 10, 30, 100, 300, 1000)


def observed_and_predicted(index_dir: Path) -> dict:
    """{"pairs", "rows": [{"observed", "threshold", "predicted", "ratio"}]} of one index."""
    from instret.calibration import unrelated_share
    from instret.index import SearchIndex

    index = SearchIndex(index_dir)
    vectors, _ = index.vectors()
    searched = index.transform(np.asarray(vectors)).astype(np.float64)
    distributions = index.manifest["scores"]
    n = len(searched)
    pairs = n * (n - 1) / 2
    scores = np.sort((searched @ searched.T)[np.triu_indices(n, 1)])[::-1]
    rows = []
    for count in COUNTS:
        if count > len(scores):
            break
        threshold = float(scores[count - 1])
        predicted = pairs * float(unrelated_share(threshold, distributions))
        rows.append(
            {
                "observed": int(np.count_nonzero(scores >= threshold)),
                "threshold": round(threshold, 4),
                "predicted": round(predicted, 1),
            }
        )
        rows[-1]["ratio"] = round(rows[-1]["predicted"] / rows[-1]["observed"], 2)
    index.close()
    return {"pairs": int(pairs), "rows": rows}


def dups_on_random(index_dir: Path) -> dict:
    from instret.duplicates import find_duplicates

    out = {}
    for label, verify in (("dups", True), ("dups, no verification", False)):
        found = find_duplicates(index_dir, verify=verify)
        out[label] = {
            "threshold": found["threshold"],
            "false_pairs_reported": len(group_pairs(found["groups"])),
            "expected_unrelated": found.get("expected_unrelated"),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="300,3925", help="photos per folder, comma-separated")
    ap.add_argument("--minutes", default="2,15", help="training minutes for each size, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", default=str(SHARED), help="the datasets folder (imagenette2/val)")
    args = ap.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    minutes = [float(v) for v in args.minutes.split(",")]
    if len(minutes) != len(sizes):
        sys.exit("calibration: give one --minutes per --sizes entry")
    shared = Path(args.shared)
    if not (shared / "imagenette2" / "val").is_dir():
        sys.exit(f"calibration: {shared}/imagenette2/val not found (pass --shared)")
    from instret.run import train

    results = {}
    for size, budget in zip(sizes, minutes):
        work = Path(tempfile.mkdtemp(prefix="instret-calibration-"))
        folder = work / "photos"
        build_collection(shared, folder, size, 0, args.seed)
        start = time.perf_counter()
        train({"data": str(folder), "out": str(work / "run"), "time_budget": budget, "seed": args.seed})
        trained = round((time.perf_counter() - start) / 60, 1)
        # The run indexes its folder at the defaults when training ends: that index is measured.
        row = {"training_minutes": trained, **observed_and_predicted(work / "run"), **dups_on_random(work / "run")}
        results[str(size)] = row
        say(f"{size} random photos ({row['pairs']} pairs), {trained} min of training:")
        for r in row["rows"]:
            say(
                f"  score >= {r['threshold']:.4f}: observed {r['observed']:5d}  predicted {r['predicted']:9.1f}"
                f"  ratio {r['ratio']:.2f}"
            )
        for label in ("dups", "dups, no verification"):
            d = row[label]
            say(f"  {label}: threshold {d['threshold']:.4f}, {d['false_pairs_reported']} false pair(s) reported")
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"seed": args.seed, "results": results}))


if __name__ == "__main__":
    main()
