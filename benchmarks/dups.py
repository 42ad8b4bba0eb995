"""Near-duplicates: planted copies in Imagenette val, found by `instret dups` and by a perceptual hash.

    python benchmarks/dups.py [--photos 3925] [--planted 500] [--minutes 15 | --model RUN_DIR]
                              [--precision 0.99] [--seed 0] [--edits basic|full] [--keep DIR]

The collection: `--photos` Imagenette val photos in one flat folder under shuffled names, plus
one planted copy of each of `--planted` of them, the kinds in turn: a byte copy, a JPEG
re-encode (q 30-90), a resize (30-80 % of the side), a crop keeping 70-90 % of the area, a
brightness shift (x0.6-0.85 or x1.15-1.4); `--edits full` adds a contrast shift, a rotation
of 3-12 degrees, a border and a caption or logo overlay (instret/edits.py). A planted pair (photo, its copy) is a true pair;
every other pair is not (Imagenette may hold a few real duplicates of its own: they count
against every method alike and are listed).

instret: an encoder trained by `instret.train` on the collection within `--minutes` (or the
given `--model`), the folder indexed with the defaults (and again with `--whiten`), then
`instret.find_duplicates` at its calibrated default: the pairs it reports are every two members
of a group. The perceptual hash (imagehash.phash, 64 bits): a pair is reported when the
Hamming distance is at most d, at the usual d = 10 and at the d that would have been best in
hindsight (the most recall at precision >= 0.99, read off the answers). imagededup's PHash,
DHash, WHash and AHash run at their own default threshold, when imagededup is installed (for
the benchmark only: `pip install imagededup`). instret runs with and without its verification
stage. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def say(msg: str) -> None:
    print(msg, flush=True)


def reencode(img, rng):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(30, 90))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resize(img, rng):
    f = rng.uniform(0.3, 0.8)
    return img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.BILINEAR)


def crop(img, rng):
    keep = rng.uniform(0.7, 0.9) ** 0.5
    w, h = round(img.width * keep), round(img.height * keep)
    left, top = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
    return img.crop((left, top, left + w, top + h))


def brightness(img, rng):
    return ImageEnhance.Brightness(img).enhance(rng.choice([rng.uniform(0.6, 0.85), rng.uniform(1.15, 1.4)]))


def contrast(img, rng):
    return ImageEnhance.Contrast(img).enhance(rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.2, 1.5)]))


def edit_of(name: str):
    """An edit of instret/edits.py (small rotation, border, caption or logo overlay)."""
    from instret import edits

    return getattr(edits, name)


BASIC = {"byte copy": None, "re-encode": reencode, "resize": resize, "crop 70-90%": crop, "brightness": brightness}
# --edits full: the list too: contrast, rotations of 3-12 degrees, borders, overlays.
FULL = {
    **BASIC,
    "contrast": contrast,
    "rotation": lambda img, rng: edit_of("rotate")(img, rng),
    "border": lambda img, rng: edit_of("border")(img, rng),
    "overlay": lambda img, rng: edit_of("overlay")(img, rng),
}
EDITS = dict(BASIC)  # what this run plants (main() sets it from --edits)


def build_collection(shared: Path, folder: Path, photos: int, planted: int, seed: int):
    """The folder of photos and planted copies; returns (true pairs as path pairs, edit of each pair)."""
    from instret.images import list_image_files, open_rgb

    rng = random.Random(seed)
    files = list_image_files(shared / "imagenette2" / "val")
    files = sorted(rng.sample(files, min(photos, len(files))))
    names = rng.sample(range(10 * (len(files) + planted)), len(files) + planted)  # shuffled: order tells nothing
    folder.mkdir(parents=True)
    placed = []
    for src, name in zip(files, names):
        dst = folder / f"img-{name:06d}{src.suffix.lower()}"
        shutil.copyfile(src, dst)
        placed.append(dst)
    pairs, kinds = [], []
    kind_names = list(EDITS)
    for n, (original, name) in enumerate(zip(rng.sample(placed, planted), names[len(files) :])):
        kind = kind_names[n % len(kind_names)]
        if EDITS[kind] is None:
            copy = folder / f"img-{name:06d}{original.suffix}"
            shutil.copyfile(original, copy)
        else:
            copy = folder / f"img-{name:06d}.jpg"
            EDITS[kind](open_rgb(original), rng).save(copy, quality=95)
        pairs.append((str(original), str(copy)))
        kinds.append(kind)
    return pairs, kinds


def score(found: set[frozenset], truth: list[frozenset], kinds: list[str]) -> dict:
    true = set(truth)
    hits = found & true
    out = {
        "pairs_reported": len(found),
        "true_pairs_found": len(hits),
        "precision": round(len(hits) / len(found), 4) if found else 1.0,
        "recall": round(len(hits) / len(true), 4),
    }
    out["recall_by_edit"] = {
        k: round(float(np.mean([t in found for t, kk in zip(truth, kinds) if kk == k])), 4) for k in EDITS
    }
    return out


def group_pairs(groups: list[dict]) -> set[frozenset]:
    pairs = set()
    for g in groups:
        paths = [m["path"] for m in g["members"]]
        pairs |= {frozenset((p, q)) for i, p in enumerate(paths) for q in paths[i + 1 :]}
    return pairs


def instret_rows(folder: Path, work: Path, model: str, precision: float, truth, kinds, results: dict) -> None:
    from instret.duplicates import find_duplicates
    from instret.indexer import build_index

    # instret as `dups` runs by default (pairs below the calibrated threshold verified by
    # alignment), the same index without the verification, and a whitened index.
    built = {}
    for label, whiten, verify in (
        ("instret", False, True),
        ("instret, no verification", False, False),
        ("instret --whiten", True, True),
    ):
        index = work / f"index-{whiten}"
        if whiten not in built:
            start = time.perf_counter()
            build_index(folder, model, index, workers=2, device="cpu", whiten=whiten)
            built[whiten] = time.perf_counter() - start
        start = time.perf_counter()
        found = find_duplicates(index, precision=precision, verify=verify)
        seconds = time.perf_counter() - start
        row = score(group_pairs(found["groups"]), truth, kinds)
        row.update(
            {
                "threshold": found["threshold"],
                "reason": found["reason"],
                "index_seconds": round(built[whiten], 1),
                "dups_seconds": round(seconds, 2),
                "groups": len(found["groups"]),
                "largest_group": max((len(g["members"]) for g in found["groups"]), default=0),
            }
        )
        results[label] = row
        report(label, row)
        say(f"    {found['reason']}")
        unplanted = group_pairs(found["groups"]) - set(truth)
        for pair in sorted(map(sorted, unplanted))[:5]:
            say(f"    not planted: {Path(pair[0]).name} ~ {Path(pair[1]).name}")


def imagededup_rows(folder: Path, truth, kinds, results: dict) -> None:
    """imagededup's four hashes at their own default threshold (Hamming distance 10 of 64 bits),
    as its users run them; installed for the benchmark only (pip install imagededup)."""
    try:
        from imagededup.methods import AHash, DHash, PHash, WHash
    except ImportError:
        say("imagededup not installed (pip install imagededup): its rows are left out")
        return
    for method in (PHash, DHash, WHash, AHash):
        start = time.perf_counter()
        found = method(verbose=False).find_duplicates(image_dir=folder)
        seconds = time.perf_counter() - start
        pairs = {frozenset((str(folder / a), str(folder / b))) for a, dups in found.items() for b in dups}
        row = score(pairs, truth, kinds)
        row["seconds"] = round(seconds, 1)
        label = f"imagededup {method.__name__}, default"
        results[label] = row
        report(label, row)


def phash_rows(folder: Path, truth, kinds, results: dict) -> None:
    import imagehash

    from instret.images import list_image_files, open_rgb

    paths = [str(p) for p in list_image_files(folder)]
    start = time.perf_counter()
    bits = np.stack([imagehash.phash(open_rgb(p)).hash.ravel() for p in paths]).astype(np.float32) * 2 - 1
    hamming = np.rint((64 - bits @ bits.T) / 2).astype(np.int16)
    seconds = time.perf_counter() - start
    iu = np.triu_indices(len(paths), 1)
    d = hamming[iu]
    index_of = {p: i for i, p in enumerate(paths)}
    true = np.zeros(len(paths) ** 2, bool)
    true[[index_of[a] * len(paths) + index_of[b] for a, b in map(tuple, truth)]] = True
    true[[index_of[b] * len(paths) + index_of[a] for a, b in map(tuple, truth)]] = True
    is_true = true.reshape(len(paths), len(paths))[iu]
    best = None
    for limit in range(33):
        reported = d <= limit
        tp = int((reported & is_true).sum())
        precision = tp / max(1, int(reported.sum()))
        if precision >= 0.99:
            best = limit
    for label, limit in (("phash, d <= 10", 10), (f"phash, best d in hindsight ({best})", best)):
        if limit is None:
            continue
        chosen = np.flatnonzero(d <= limit)
        found = {frozenset((paths[iu[0][k]], paths[iu[1][k]])) for k in chosen}
        row = score(found, truth, kinds)
        row.update({"max_hamming": limit, "seconds": round(seconds, 1)})
        results[label] = row
        report(label, row)


def report(label: str, row: dict) -> None:
    edits = "  ".join(f"{k} {v:.2f}" for k, v in row["recall_by_edit"].items())
    say(
        f"{label:34s} precision {row['precision']:.4f}  recall {row['recall']:.4f}  ({row['pairs_reported']} pairs)   {edits}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=3925)
    ap.add_argument("--planted", type=int, default=500)
    ap.add_argument("--minutes", type=float, default=15.0, help="time budget of the encoder trained on the collection")
    ap.add_argument("--model", help="use this encoder (encoder.pt or a run folder) instead of training one")
    ap.add_argument("--precision", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--edits", choices=("basic", "full"), default="basic", help="full adds contrast, rotations, borders, overlays"
    )
    ap.add_argument("--keep", help="build the collection here and keep it (default: a temporary folder)")
    ap.add_argument("--shared", default=str(SHARED), help="the datasets folder (imagenette2/val)")
    args = ap.parse_args()
    EDITS.clear()
    EDITS.update(FULL if args.edits == "full" else BASIC)
    shared = Path(args.shared)
    if not (shared / "imagenette2" / "val").is_dir():
        sys.exit(f"dups: {shared}/imagenette2/val not found (pass --shared)")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="instret-dups-"))
    folder = work / "collection"
    truth, kinds = build_collection(shared, folder, args.photos, args.planted, args.seed)
    truth = [frozenset(p) for p in truth]
    say(f"collection: {args.photos} photos + {args.planted} planted copies ({', '.join(EDITS)}, in turn)")
    results: dict = {}
    model = args.model
    if model is None:
        from instret.run import train

        start = time.perf_counter()
        train({"data": str(folder), "out": str(work / "run"), "time_budget": args.minutes, "seed": args.seed})
        results["training_minutes"] = round((time.perf_counter() - start) / 60, 1)
        model = str(work / "run")
    instret_rows(folder, work, model, args.precision, truth, kinds, results)
    phash_rows(folder, truth, kinds, results)
    imagededup_rows(folder, truth, kinds, results)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "photos": args.photos,
                "planted": args.planted,
                "model": args.model or "trained",
                "precision_asked": args.precision,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
