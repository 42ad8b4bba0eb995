"""Index-build pipeline benchmark: how decoding workers, encoder threads and batch size share the CPU.

    python benchmarks/index_pipeline.py --model RUN_DIR [--data DIR]... [--images N] [--repeats 3]

For each folder: images/s of decoding (worker processes) plus encoding, as `instret index`
runs them (instret.images.iter_decoded, then the encoder), for several (workers, encoder
threads, batch) settings, against the encoder alone on images decoded beforehand (the
ceiling). Two more rows bound the pipeline: decoding alone (no encoder), and the pipeline
with decoding cut to Pillow's libjpeg call (LibjpegOnly). The settings and the ceiling are
measured in turn, `--repeats` times, and the medians kept, so that a shared, noisy machine
affects them alike. The last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from instret.encoder import embed_images, load_encoder
from instret.images import iter_decoded, list_image_files

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import decoded, encoder_images_per_s  # the encoder-alone ceiling, as benchmarks/search.py measures it

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# (decoding workers, encoder threads, batch, decoding): before 2026-11-29 `index` ran (2, 2, 256);
# it runs (2, 1, 64). 0 encoder threads: decoding alone. "libjpeg only": see LibjpegOnly.
SETTINGS = [
    (2, 2, 256, "index"),
    (2, 2, 64, "index"),
    (2, 1, 64, "index"),
    (1, 2, 64, "index"),
    (2, 0, 64, "index"),
    (2, 1, 64, "libjpeg only"),
]


class LibjpegOnly(torch.utils.data.Dataset):
    """Item i: the file read and decoded by Pillow as `index` decodes it (at the draft scale),
    and nothing else: no border trim, resize, hash or checks. The encoder is handed a blank
    image of its size, so a pipeline over this set bounds what any work on decoding can gain."""

    def __init__(self, paths, size: int):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(io.BytesIO(Path(self.paths[i]).read_bytes()))
        img.draft("RGB", (self.size, self.size))
        img.load()
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8)


def pipeline_images_per_s(encoder, paths, workers: int, threads: int, batch: int, decoding: str) -> float:
    if threads:
        torch.set_num_threads(threads)
    if decoding == "libjpeg only":
        batches = torch.utils.data.DataLoader(LibjpegOnly(paths, encoder.image_size), batch, num_workers=workers)
    else:
        batches = (images for _, images, _, _ in iter_decoded(paths, encoder.image_size, workers, batch, hashes=True))
    start, n = time.perf_counter(), 0
    for images in batches:
        if threads:
            embed_images(encoder.model, images, encoder.mean, encoder.std)
        n += len(images)
    return n / (time.perf_counter() - start)


def bench_folder(folder: str, encoder, count: int, repeats: int, threads: int) -> dict:
    paths = list_image_files(folder)[:count]
    images = decoded(encoder, paths)
    torch.set_num_threads(threads)
    encoder_images_per_s(encoder, images[:256])  # warm
    alone, measured = [], {s: [] for s in SETTINGS}
    for _ in range(repeats):
        torch.set_num_threads(threads)
        alone.append(encoder_images_per_s(encoder, images))
        for setting in SETTINGS:
            measured[setting].append(pipeline_images_per_s(encoder, paths, *setting))
    ceiling = float(np.median(alone))
    rows = []
    for (workers, encoder_threads, batch, decoding), values in measured.items():
        rate = float(np.median(values))
        rows.append(
            {
                "workers": workers,
                "encoder_threads": encoder_threads,
                "batch": batch,
                "decoding": decoding,
                "images_per_s": round(rate, 1),
                "efficiency": round(rate / ceiling, 3),
            }
        )
        print(f"[{Path(folder).name}] {rows[-1]}", flush=True)
    return {"images": len(paths), "encoder_alone_images_per_s": round(ceiling, 1), "settings": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="encoder.pt or a run folder")
    ap.add_argument("--data", action="append", help="image folder (repeatable) [CIFAR-10 test, Imagenette val]")
    ap.add_argument("--images", type=int, default=10_000, help="images per folder, at most")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    folders = args.data or [str(SHARED / "cifar10" / "test"), str(SHARED / "imagenette2" / "val")]
    for folder in folders:
        if not Path(folder).is_dir():
            sys.exit(f"index pipeline benchmark: data folder {folder} not found (pass --data)")
    threads = torch.get_num_threads()
    torch.set_grad_enabled(False)
    encoder = load_encoder(args.model)
    results = {folder: bench_folder(folder, encoder, args.images, args.repeats, threads) for folder in folders}
    print(json.dumps({"model": args.model, "threads": threads, "results": results}))


if __name__ == "__main__":
    main()
