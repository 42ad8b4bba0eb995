"""merge-index with an IVF layout: the shards' lists filled on disk against the in-memory merge,
in one run: peak memory, seconds, and the same search results.

    python benchmarks/merge_on_disk.py [--rows 1000000] [--shards 4] [--layout IVF4096,Flat]

Shard indexes of synthetic 128-d vectors (index_sizing.clustered: low intrinsic dimension, like
learned features) are written as `instret index --shard I/N` writes them, for files that do not
exist (calibration leaves those out). Each merge then runs in its own process, which reports
the memory it had before merging and at its peak. Both
indexes are searched with instret's default nprobe on QUERIES vectors: recall@10 against exact
search, and the share of top-10 lists the two return identically. Memory is the anonymous
resident memory (/proc/self/status RssAnon, sampled every 10 ms): pages of memory-mapped files
are the kernel's to drop, so they are reported beside it (peak RSS) but not counted. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index_sizing import QUERIES, clustered

from instret.encoder import Encoder, save_encoder
from instret.index import SearchIndex, make_manifest, write_generation, writer_lock


def anon_mb() -> float:
    """This process's anonymous resident memory: what must fit in RAM. Pages of memory-mapped
    files (the vectors.npy being written) are left out: the kernel writes them back and drops
    them under pressure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakSampler(threading.Thread):
    """The largest anon_mb() seen, sampled every 10 ms while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = anon_mb(), threading.Event()

    def run(self):
        while not self.done.wait(0.01):
            self.peak = max(self.peak, anon_mb())


def write_shards(folder: Path, x: np.ndarray, shards: int) -> list[Path]:
    encoder_file = folder / "encoder.pt"
    save_encoder(Encoder("small", x.shape[1], 32), encoder_file, (0.5,) * 3, (0.25,) * 3)
    dirs = []
    for part in range(shards):
        rows = np.arange(part, len(x), shards)
        files = [(i, f"img/{r:09d}.jpg", 1, 1, "") for i, r in enumerate(rows)]
        extra = {"postprocess": {"whiten": False}, "scores": None}
        manifest = make_manifest(x[rows], "Flat", "synthetic", "small", 32, folder, 0, (part, shards), extra)
        out = folder / f"shard-{part}"
        with writer_lock(out):
            write_generation(out, 1, manifest, x[rows], np.arange(len(rows)), files, [], encoder_file)
        dirs.append(out)
    return dirs


def merge_child(mode: str, shard_dirs: list[str], out: str, layout: str) -> None:
    """One merge in this process; prints {"mode", "seconds", "anon_before_mb", "peak_anon_mb", "peak_rss_mb"}."""
    from instret.encoder import load_encoder
    from instret.ondisk import merge_on_disk
    from instret.shards import _merge_in_memory

    shards = [SearchIndex(d) for d in shard_dirs]
    encoder = load_encoder(shards[0].gen_dir / "encoder.pt")
    sampler = PeakSampler()
    before = sampler.peak
    sampler.start()
    start = time.perf_counter()
    with writer_lock(Path(out)):
        (merge_on_disk if mode == "on-disk" else _merge_in_memory)(shards, Path(out), layout, None, False, encoder)
    seconds = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; mapped files included
    result = {"mode": mode, "seconds": round(seconds, 1), "anon_before_mb": round(before)}
    print(json.dumps({**result, "peak_anon_mb": round(sampler.peak), "peak_rss_mb": round(peak_rss)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--layout", default="IVF4096,Flat")
    parser.add_argument(
        "--modes", nargs="+", default=["on-disk", "in-memory"], help="in-memory alone needs 2.7 KB a vector of RAM."
    )
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SHARDS", "OUT", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, shard_dirs, out, layout = args.child
        merge_child(mode, shard_dirs.split(","), out, layout)
        return
    import faiss

    with tempfile.TemporaryDirectory(prefix="merge-on-disk-") as tmp:
        tmp = Path(tmp)
        x = clustered(args.rows)
        dirs = write_shards(tmp, x, args.shards)
        queries = clustered(QUERIES, seed=1)
        exact = faiss.IndexFlatIP(x.shape[1])
        exact.add(x)
        truth = exact.search(queries, 10)[1]  # row r holds id r: shards keep the listing order
        del exact, x
        results, tops = {}, {}
        for mode in args.modes:
            child = [sys.executable, __file__, "--child", mode, ",".join(map(str, dirs)), str(tmp / mode), args.layout]
            proc = subprocess.run(child, capture_output=True, text=True, check=True)
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            index = SearchIndex(tmp / mode)
            tops[mode] = index.faiss_index().search(index.transform(queries), 10)[1]
            results[mode]["recall@10"] = round(
                float(np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, tops[mode])])), 3
            )
            results[mode]["bytes_on_disk_per_vector"] = round(
                sum(f.stat().st_size for f in index.gen_dir.iterdir()) / args.rows
            )
            index.close()
            print(json.dumps(results[mode]), flush=True)
    growth = {m: r["peak_anon_mb"] - r["anon_before_mb"] for m, r in results.items()}
    print(f"{args.rows:,} vectors in {args.shards} shards, {args.layout}, 2 CPU cores:")
    print("| merge | seconds | memory the merge adds (anonymous, peak) | peak RSS with mapped files | recall@10 |")
    print("| --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        print(f"| {mode} | {r['seconds']} | {growth[mode]} MB | {r['peak_rss_mb']} MB | {r['recall@10']} |")
    summary = {"rows": args.rows, "shards": args.shards, "layout": args.layout, **results}
    if len(results) == 2:
        summary["added_memory_ratio"] = round(growth["on-disk"] / max(growth["in-memory"], 1), 3)
        summary["same_top10"] = round(float((tops["on-disk"] == tops["in-memory"]).all(axis=1).mean()), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
