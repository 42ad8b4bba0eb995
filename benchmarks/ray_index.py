"""Indexing on Ray against the plain build, on one machine, in one run.

    python benchmarks/ray_index.py [--model RUN_DIR] [--photos 3925] [--shared DIR]

Imagenette val (or its first `--photos` files) indexed from scratch twice with the same encoder
(`--model`, else an untrained `small` one saved for the run: the encoder's weights do not change
the cost): the plain build (`instret index`, decoding workers at the default) and `index --ray`
(a local Ray started for the build, CPU actors sized to the cores). Printed for each: when the
first batch came back, the steady rate after it, images/s over the whole encoding; their ratios;
the start-up of a local Ray alone (ray.init to ready and shutdown), and whether the two indexes
are equal (ids, paths, vectors within 1e-5). The last stdout line is one JSON object.
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def say(msg: str) -> None:
    print(msg, flush=True)


def untrained_encoder(work: Path) -> Path:
    from instret.encoder import Encoder, save_encoder

    model = Encoder("small", 128, 32)
    save_encoder(model, work / "encoder.pt", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return work / "encoder.pt"


def ray_start_seconds() -> float:
    import ray

    from instret.env import usable_cpus

    start = time.perf_counter()
    ray.init(num_cpus=usable_cpus(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.get(ray.remote(lambda: 1).remote())
    ray.shutdown()
    return time.perf_counter() - start


def watch_staging() -> list:
    """[(time, rows)] of every batch committed to staging from now on (the list is cleared by the caller)."""
    from instret import metadata

    commits, real_add = [], metadata.Staging.add

    def add(self, rows):
        real_add(self, rows)
        commits.append((time.perf_counter(), len(rows)))

    metadata.Staging.add = add
    return commits


def same_index(a: Path, b: Path) -> bool:
    from instret.index import SearchIndex

    x, y = SearchIndex(a), SearchIndex(b)
    (vx, ix), (vy, iy) = x.vectors(), y.vectors()
    rows = [e[:5] for e in x.entries()] == [e[:5] for e in y.entries()]
    return bool(np.array_equal(ix, iy) and rows and np.abs(np.asarray(vx) - np.asarray(vy)).max() <= 1e-5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="encoder.pt or a run folder [an untrained small encoder]")
    ap.add_argument("--photos", type=int, default=3925)
    ap.add_argument("--shared", default=str(SHARED), help="the datasets folder (imagenette2/val)")
    args = ap.parse_args()
    source = Path(args.shared) / "imagenette2" / "val"
    if not source.is_dir():
        sys.exit(f"ray_index: {source} not found (pass --shared)")
    from instret.images import list_image_files
    from instret.indexer import build_index

    work = Path(tempfile.mkdtemp(prefix="instret-ray-index-"))
    photos = work / "photos"
    for path in list_image_files(source)[: args.photos]:
        (photos / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, photos / path.parent.name / path.name)
    model = args.model or untrained_encoder(work)
    startup = ray_start_seconds()
    say(f"local Ray start-up (init, one task, shutdown): {startup:.1f} s")
    results = {"photos": args.photos, "ray_startup_seconds": round(startup, 1)}
    commits = watch_staging()
    for label, ray in (("plain", None), ("ray", "local")):
        commits.clear()
        start = time.perf_counter()
        summary = build_index(photos, model, work / label, device="cpu", ray=ray)
        seconds = time.perf_counter() - start
        # Steady rate: the images committed after the first batch, over the time since it came back
        # (a Ray build first starts Ray and its actors; a plain one its decoding workers).
        first, last = commits[0], commits[-1]
        steady = sum(n for _, n in commits[1:]) / max(last[0] - first[0], 1e-9)
        results[label] = {
            "images_per_s": summary["images_per_s"],
            "steady_images_per_s": round(steady, 1),
            "first_batch_seconds": round(first[0] - start, 1),
            "build_seconds": round(seconds, 1),
        }
        say(
            f"{label}: first batch back after {first[0] - start:.1f} s, then {steady:.0f} images/s; "
            f"{summary['images_per_s']} images/s over the whole encoding, build {seconds:.1f} s"
        )
    ray_row, plain_row = results["ray"], results["plain"]
    results["steady_ratio"] = round(ray_row["steady_images_per_s"] / plain_row["steady_images_per_s"], 3)
    results["whole_ratio"] = round(ray_row["images_per_s"] / plain_row["images_per_s"], 3)
    results["equal"] = same_index(work / "plain", work / "ray")
    say(
        f"ray / plain: {results['steady_ratio']:.2f} of the steady rate, {results['whole_ratio']:.2f} of the "
        f"whole encoding's (start-up included); equal: {results['equal']}"
    )
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
