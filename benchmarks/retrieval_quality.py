"""Search quality: instret's encoder against the cheap baselines, every method on the same queries.

    python benchmarks/retrieval_quality.py [--parts copy,multiview] [--originals 500] [--copies 2]
                                           [--distractors 1000] [--views 0] [--minutes 15] [--set JSON]
                                           [--seed 0] [--keep DIR]

The collection a user would index: `--originals` Imagenette val photos (evenly over its 10
classes) plus `--distractors` CIFAR-10 test images, in one folder. Copy detection: each
original gets `--copies` edited copies (instret.edits: crops of 40-90 % of the area, resizes,
JPEG q20-70, colour and brightness shifts, greyscale, flips, small rotations, blur, borders,
text or logo overlays, and combinations), and each copy is a query whose one relevant item is
its original: recall@1, recall@10, mAP (= mean reciprocal rank of the original). Category
retrieval, a secondary signal: each original queries the other originals, relevant = same class
(mAP, precision@10).

Methods: raw pixels (32 x 32, centred), an 8 x 8 x 8 colour histogram (square-rooted: the
Hellinger kernel), a 64-bit perceptual hash (imagehash.phash, Hamming distance), the untrained
network, and instret's encoder trained by `instret.train` on the collection folder within
`--minutes` (the time budget, on this machine's cores) with its defaults (`--set` overrides
options). Every method reads an image the way instret does, flat borders (a frame,
letterbox bars) trimmed first (instret.borders), so that the comparison is of the features
alone. Each "+pp" row adds whitening fitted on the collection (`instret index --whiten`);
the plain "instret" row is what `instret index` + `instret query` give by default.

Multi-view (part `multiview`, ETH-80 from the datasets folder): the same object seen from
another side. Every image of the 80 objects (41 views each; `--views N` keeps N per object) is
in one flat folder, trained on and indexed; two views of each object are queries, every other
view of that object is relevant, the query itself dropped: mAP, recall@1, precision@10, and
category mAP (relevant = the same kind of object: 8 kinds) as a secondary signal. Methods:
pixels, the colour histogram, the untrained network, and instret trained on the folder: as it
was before (`--multi-view off --neighbourhoods off`), without neighbourhoods, and at the defaults.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from instret.borders import trim_borders
from instret.colour import colour_signature
from instret.edits import EDITS, edited_copy
from instret.encoder import Encoder, calibrated_copy, embed_images, load_encoder
from instret.images import encoder_inputs, list_image_files, open_rgb
from instret.postprocess import expand_database, expand_queries, fit_whitening, normalise
from instret.searcher import retrieval_metrics

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def say(msg: str) -> None:
    print(msg, flush=True)


# --- the collection and its queries ------------------------------------------------------


def build_collection(shared: Path, work: Path, originals: int, copies: int, distractors: int, seed: int):
    """Copy the photos and distractors into work/collection; write the edited copies to work/queries.
    Returns (database paths, labels (-1: distractor), query paths, query targets, query edit names)."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in (shared / "imagenette2" / "val").iterdir() if p.is_dir())
    per_class = originals // len(classes)
    photos = []
    for label, c in enumerate(classes):
        files = sorted((shared / "imagenette2" / "val" / c).iterdir())
        photos += [(f, label) for f in rng.sample(files, per_class)]
    cifar = list_image_files(shared / "cifar10" / "test")
    extra = [(f, -1) for f in rng.sample(cifar, distractors)]
    (work / "collection").mkdir(parents=True)  # one flat folder: unlabelled, as a user's would be
    (work / "queries").mkdir()
    db_paths, labels = [], []
    for i, (src, label) in enumerate(photos + extra):
        dst = work / "collection" / f"{'photo' if label >= 0 else 'other'}-{i:05d}{src.suffix.lower()}"
        shutil.copyfile(src, dst)
        db_paths.append(dst)
        labels.append(label)
    names = sorted(EDITS)
    q_paths, targets, kinds = [], [], []
    for i, (src, _) in enumerate(photos):
        img = open_rgb(src)
        for c in range(copies):
            kind = names[(i * copies + c) % len(names)]
            dst = work / "queries" / f"{i:05d}-{c}-{kind}.png"
            edited_copy(img, kind, rng).save(dst)
            q_paths.append(dst)
            targets.append(i)
            kinds.append(kind)
    return db_paths, np.array(labels), q_paths, np.array(targets), kinds


# --- the methods -------------------------------------------------------------------------


def picture(path) -> Image.Image:
    """An image as every method reads it: upright RGB, flat borders trimmed."""
    return trim_borders(open_rgb(path))


def pixels(paths) -> np.ndarray:
    return np.stack(
        [np.asarray(picture(p).resize((32, 32), Image.BILINEAR), dtype=np.float32).ravel() / 255 for p in paths]
    )


def colour_histogram(paths, bins: int = 8) -> np.ndarray:
    out = []
    for p in paths:
        x = np.asarray(picture(p).resize((128, 128), Image.BILINEAR)) // (256 // bins)
        codes = (x[..., 0].astype(np.int64) * bins + x[..., 1]) * bins + x[..., 2]
        h = np.bincount(codes.ravel(), minlength=bins**3).astype(np.float32)
        out.append(np.sqrt(h / h.sum()))
    return np.stack(out)


def phash(paths) -> np.ndarray:
    import imagehash

    # +-1 bits / 8: the inner product is 1 - 2 * Hamming / 64, the same ranking as Hamming distance.
    return np.stack([np.where(imagehash.phash(picture(p)).hash.ravel(), 1.0, -1.0) / 8 for p in paths]).astype(
        np.float32
    )


def encoder_vectors(model, mean, std, size: int, paths) -> np.ndarray:
    return embed_images(model, encoder_inputs(paths, size)[1], mean, std, batch_size=256).numpy()


def untrained(db_paths, size: int, seed: int):
    """The network before training, BatchNorm statistics measured on the collection."""
    torch.manual_seed(seed)
    model = Encoder("small", 128, size)
    images = encoder_inputs(db_paths, size)[1]  # read as instret index reads a file
    x = images.float() / 255
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).tolist())
    model = calibrated_copy(model, images.split(256), mean, std)
    return lambda paths: encoder_vectors(model, mean, std, size, paths)


def train_encoder(collection: Path, work: Path, minutes: float, overrides: dict, seed: int):
    from instret.run import train

    options = {"data": str(collection), "out": str(work / "run"), "time_budget": minutes, "seed": seed, **overrides}
    start = time.perf_counter()
    train(options)
    seconds = time.perf_counter() - start
    return load_encoder(work / "run"), seconds, json.loads((work / "run" / "config.json").read_text())


def indexed_vectors(enc, paths) -> np.ndarray:
    """As `instret index` encodes (LoadedEncoder.embed_inputs: with the colour signature of an
    encoder trained for several views)."""
    return enc.embed_inputs(encoder_inputs(paths, enc.image_size)[1])


# --- scoring -----------------------------------------------------------------------------


def copy_detection(db: np.ndarray, queries: np.ndarray, targets: np.ndarray, seed: int) -> tuple[dict, np.ndarray]:
    """recall@1, recall@10, mAP with one relevant item per query; ties broken at random."""
    sims = queries @ db.T  # Q x N
    sims = sims + np.random.default_rng(seed).uniform(0, 1e-6, sims.shape)  # random order among equal scores
    target = sims[np.arange(len(targets)), targets]
    ranks = 1 + (sims > target[:, None]).sum(axis=1)
    return {
        "recall@1": float((ranks == 1).mean()),
        "recall@10": float((ranks <= 10).mean()),
        "mAP": float((1 / ranks).mean()),
    }, ranks


def category(db: np.ndarray, labels: np.ndarray) -> dict:
    keep = labels >= 0
    m = retrieval_metrics(db[keep], labels[keep])
    return {"mAP": m["mAP"], "precision@10": m["precision@10"]}


def evaluate(name: str, db: np.ndarray, queries: np.ndarray, labels, targets, kinds, seed: int, results: dict):
    db, queries = normalise(db), normalise(queries)
    white = fit_whitening(db)
    variants = {name: (db, queries), f"{name}+pp": (white(db), white(queries))}
    for label, (d, q) in variants.items():
        copy, ranks = copy_detection(d, q, targets, seed)
        results[label] = {
            "copy": copy,
            "category": category(d, labels),
            "copy_recall@1_by_edit": {
                k: float(np.mean([r == 1 for r, kk in zip(ranks, kinds) if kk == k])) for k in sorted(set(kinds))
            },
        }
        say(
            f"{label:18s} copy mAP {copy['mAP']:.3f} R@1 {copy['recall@1']:.3f} R@10 {copy['recall@10']:.3f}   "
            f"category mAP {results[label]['category']['mAP']:.3f} P@10 {results[label]['category']['precision@10']:.3f}"
        )
    return white


# --- multi-view: the same object from another side -----------------------------------------


def build_multiview(shared: Path, work: Path, views: int, seed: int):
    """ETH-80 in one flat folder (work/multiview); returns (paths, object labels, category
    labels, query rows: two views of each object)."""
    rng = random.Random(seed)
    objects = sorted(p for p in (shared / "eth80").iterdir() if p.is_dir())
    (work / "multiview").mkdir(parents=True)
    paths, objs = [], []
    for label, folder in enumerate(objects):
        files = sorted(folder.glob("*.jpg"))
        for src in sorted(rng.sample(files, views)) if 0 < views < len(files) else files:
            shutil.copyfile(src, work / "multiview" / src.name)
            paths.append(work / "multiview" / src.name)
            objs.append(label)
    objs = np.array(objs)
    kinds = sorted({f.name.rstrip("0123456789") for f in objects})
    cats = np.array([kinds.index(objects[o].name.rstrip("0123456789")) for o in objs])
    queries = np.array([q for o in range(len(objects)) for q in rng.sample(list(np.flatnonzero(objs == o)), 2)])
    return paths, objs, cats, queries


def ranked_metrics(x: np.ndarray, labels: np.ndarray, queries: np.ndarray) -> dict:
    """Each query row against every other row: mAP, recall@1, precision@10 (relevant: same label)."""
    sims = x[queries] @ x.T
    sims[np.arange(len(queries)), queries] = -np.inf  # the query itself is dropped
    order = np.argsort(-sims, axis=1, kind="stable")[:, :-1]
    rel = labels[order] == labels[queries][:, None]  # Q x (n - 1), relevance in rank order
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    return {
        "mAP": float(((precision * rel).sum(axis=1) / rel.sum(axis=1)).mean()),
        "recall@1": float(rel[:, 0].mean()),
        "precision@10": float(rel[:, :10].mean()),
    }


def multiview(shared: Path, work: Path, args, results: dict) -> None:
    paths, objs, cats, queries = build_multiview(shared, work, args.views, args.seed)
    say(f"multi-view: {len(paths)} views of {objs.max() + 1} objects, {len(queries)} queries")
    part = results.setdefault("multiview", {})

    def score(name: str, vectors: np.ndarray) -> None:
        x = normalise(vectors)
        part[name] = {**ranked_metrics(x, objs, queries), "category_mAP": ranked_metrics(x, cats, queries)["mAP"]}
        r = part[name]
        say(
            f"{name:44s} mAP {r['mAP']:.3f} R@1 {r['recall@1']:.3f} P@10 {r['precision@10']:.3f}   "
            f"category mAP {r['category_mAP']:.3f}"
        )

    score("pixels", pixels(paths))
    score("colour_hist", colour_histogram(paths))
    # The colour signature an encoder trained for views searches beside its features, alone.
    score("colour_signature", colour_signature(encoder_inputs(paths, 32)[1]).numpy())
    overrides = json.loads(args.set)
    size = 32
    variants = {
        "instret, multi-view off, neighbourhoods off": {"multi_view": "off", "neighbourhoods": "off"},
        "instret, neighbourhoods off": {"neighbourhoods": "off"},
        "instret (defaults)": {},
    }
    chosen = {name: variants[name] for name in args.variants.split(",")} if args.variants else variants
    for name, change in chosen.items() if args.minutes > 0 else ():
        run = work / f"multiview-{len(part)}"
        enc, seconds, cfg = train_encoder(work / "multiview", run, args.minutes, {**overrides, **change}, args.seed)
        size = cfg["image_size"]
        inputs = encoder_inputs(paths, size)[1]  # decoded once for both rows
        score(name, enc.embed_inputs(inputs))
        if enc.colour_weight:  # what the colour signature adds: the learned features alone
            score(f"{name}, features alone", embed_images(enc.model, inputs, enc.mean, enc.std, batch_size=256).numpy())
        rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").open()]
        part[name].update(
            seconds=round(seconds, 1),
            epochs=cfg["epochs"],
            multi_view=cfg["multi_view"],
            neighbourhoods=cfg["neighbourhoods"],
            rounds=[
                {k: v for k, v in r.items() if k.startswith("neighbourhood")}
                for r in rows
                if "neighbourhood_round" in r
            ],
        )
    score("untrained", untrained(paths, size, args.seed)(paths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="copy,multiview", help="copy, multiview or both (comma-separated)")
    ap.add_argument("--views", type=int, default=0, help="multi-view: views kept per object (0: all 41)")
    ap.add_argument(
        "--variants",
        default="",
        help="multi-view: the trained variants to run, comma-separated (default: all; e.g. 'instret (defaults)')",
    )
    ap.add_argument("--originals", type=int, default=500)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=15.0, help="time budget of the trained encoder (0: skip it)")
    ap.add_argument("--set", default="{}", help="JSON of training options over instret's defaults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="build the collection here and keep it (default: a temporary folder)")
    ap.add_argument("--shared", default=str(SHARED), help="the datasets folder (imagenette2/val, cifar10/test)")
    args = ap.parse_args()
    shared, parts = Path(args.shared), set(args.parts.split(","))
    needs = {"copy": ("imagenette2/val", "cifar10/test"), "multiview": ("eth80",)}
    missing = [f"{shared}/{d}" for part in sorted(parts & set(needs)) for d in needs[part] if not (shared / d).is_dir()]
    if missing or not parts <= set(needs):
        sys.exit(
            f"retrieval_quality: {', '.join(missing)} not found (pass --shared)"
            if missing
            else "--parts: copy, multiview"
        )
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="instret-quality-"))
    start = time.perf_counter()
    results: dict = {}
    if "copy" in parts:
        copy_part(shared, work, args, results)
    if "multiview" in parts:
        multiview(shared, work, args, results)
    results["seconds"] = round(time.perf_counter() - start, 1)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


def copy_part(shared: Path, work: Path, args, results: dict) -> None:
    db_paths, labels, q_paths, targets, kinds = build_collection(
        shared, work, args.originals, args.copies, args.distractors, args.seed
    )
    say(
        f"collection: {sum(labels >= 0)} photos + {sum(labels < 0)} distractors; {len(q_paths)} edited copies as queries"
    )
    common = (labels, targets, kinds, args.seed, results)
    for name, fn in (("pixels", pixels), ("colour_hist", colour_histogram), ("phash", phash)):
        evaluate(name, fn(db_paths), fn(q_paths), *common)
    trained = None
    if args.minutes > 0:
        enc, seconds, cfg = train_encoder(work / "collection", work, args.minutes, json.loads(args.set), args.seed)
        trained = functools.partial(indexed_vectors, enc)
        results["training"] = {
            "seconds": round(seconds, 1),
            "epochs": cfg["epochs"],
            "image_size": cfg["image_size"],
            "arch": cfg["arch"],
            "budget_minutes": args.minutes,
            "neighbourhoods": cfg["neighbourhoods"],
        }
        say(f"trained {cfg['arch']} at {cfg['image_size']} px for {cfg['epochs']} epochs in {seconds:.0f} s")
    size = results.get("training", {}).get("image_size", 64)
    random_net = untrained(db_paths, size, args.seed)
    evaluate("untrained", random_net(db_paths), random_net(q_paths), *common)
    if trained is not None:
        db, q = normalise(trained(db_paths)), normalise(trained(q_paths))
        white = evaluate("instret", db, q, *common)
        d, w = white(db), white(q)
        top = np.argsort(-(w @ d.T), axis=1)[:, :2]
        qe = expand_queries(w, d, top, np.take_along_axis(w @ d.T, top, axis=1))
        # Query expansion and database-side augmentation on top of whitening (k = 2): measured, off by default.
        for name, (d2, q2) in (("instret+pp+qe", (d, qe)), ("instret+pp+dba", (expand_database(d, k=2), w))):
            copy, _ = copy_detection(d2, q2, targets, args.seed)
            results[name] = {"copy": copy, "category": category(d2, labels)}
            say(
                f"{name:18s} copy mAP {copy['mAP']:.3f} R@1 {copy['recall@1']:.3f}   "
                f"category mAP {results[name]['category']['mAP']:.3f}"
            )
    results["setup"] = {
        "originals": int(sum(labels >= 0)),
        "distractors": int(sum(labels < 0)),
        "queries": len(q_paths),
        "seed": args.seed,
    }


if __name__ == "__main__":
    main()
