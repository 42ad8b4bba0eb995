"""The first README command (`instret train`: the embedded digits, 40 epochs, then their index and
a sample query), timed with the per-epoch monitor viewing a fixed 512 training images (before
2026-11-29) and an eighth of the set (`instret.trainer.monitor_sample`: 179 of the 1,438 digits),
alternated `--rounds` times in one process so that the machine's load hits both.

    python benchmarks/embedded_default.py [--rounds 2] [--epochs 40]

Training itself is the same in both (the monitor has its own random stream and evaluates a
copy), so the final kNN must match. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from instret import evaluation
from instret.run import train

SAMPLES = {"fixed 512": lambda images: 512, "an eighth": evaluation.monitor_sample}


def timed_run(epochs: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="instret-default-")) / "run"
    start = time.perf_counter()
    final = train({"out": str(out), "epochs": epochs})
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_s": round(wall, 1),
        "epochs_s": round(sum(r["seconds"] for r in rows), 1),
        "monitor_s": round(sum(r["monitor_seconds"] for r in rows), 1),
        "knn_top1": final["knn_top1"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    runs = {name: [] for name in SAMPLES}
    for _ in range(args.rounds):
        for name, sample in SAMPLES.items():
            evaluation.monitor_sample = sample  # what evaluation.monitor() calls
            runs[name].append(timed_run(args.epochs))
            print(name, runs[name][-1], flush=True)
    walls = {name: sum(r["wall_s"] for r in rows) for name, rows in runs.items()}
    print(
        json.dumps(
            {
                "epochs": args.epochs,
                "runs": runs,
                "speedup": round(walls["fixed 512"] / walls["an eighth"], 2),
                "same_knn": len({r["knn_top1"] for rows in runs.values() for r in rows}) == 1,
            }
        )
    )


if __name__ == "__main__":
    main()
