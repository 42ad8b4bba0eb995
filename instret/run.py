"""A run from start to end, as `instret train` does it: the configuration resolved (what
`auto` means on this machine), a resume checked against what was saved, the run folder laid
out, the Trainer fitted (started again once when the multi-view check asks), then the run's
index and its first search. The training loop itself is instret.trainer's."""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime
from pathlib import Path

import torch

from instret.config import DEFAULT_EPOCHS, PAPER_EPOCHS, TrainConfig, multi_view_text, with_presets
from instret.data import TrainData, auto_image_size, load_train_data
from instret.defaults import IMAGE_SIZE
from instret.demo import first_search, next_commands
from instret.device import resolve_device
from instret.distributed import World, broadcast_object, process_group, world_from_env
from instret.encoder import resolve_arch
from instret.errors import InstretError
from instret.index import SearchIndex
from instret.indexer import build_index
from instret.progress import log, plural
from instret.storage import atomic_write_text, remove_stale_temps
from instret.trainer import CHECKPOINT, SeveralViews, Trainer, load_checkpoint, views_text


def resolve(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill in what `auto` and `None` mean, so config.json records what actually ran."""
    d = cfg.to_dict()
    d["arch"] = resolve_arch(cfg.arch, device)
    if cfg.data is not None:
        d["dataset"] = None  # a folder: no built-in dataset is used
    if cfg.image_size is None:
        d["image_size"] = auto_image_size(cfg.data, device.type) if cfg.data is not None else IMAGE_SIZE
    if cfg.epochs is None and cfg.time_budget is None:
        d["epochs"] = DEFAULT_EPOCHS.get(cfg.dataset if cfg.data is None else "", PAPER_EPOCHS)
    if cfg.out is None:
        d["out"] = str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    return TrainConfig.from_dict(d)


# Options that may differ when a run is resumed: they change where and how long, not what.
RESUMABLE = {"epochs", "device", "workers", "out", "stream"}


def train(options: TrainConfig | dict, resume: bool = False) -> dict | None:
    """Train (or resume) a run; returns final.json's content (None in processes other than
    rank 0 of a torchrun job). The library entry of `instret train`.

    options: a TrainConfig, or a dict of the options given (with resume: those to change);
    a dict gets its dataset's preset (config.DATASET_PRESETS) under it.
    """
    started = time.perf_counter()  # a time budget counts from here: loading the data is part of it
    given = options.to_dict() if isinstance(options, TrainConfig) else dict(options)
    world = world_from_env()  # one process, or one of several started by torchrun
    cfg = _resumed_config(given) if resume else TrainConfig.from_dict(with_presets(given))
    device = resolve_device(cfg.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    cfg = resolve(cfg, device)
    with process_group(world, device):
        if world.distributed:  # a run folder named by the clock: every process uses rank 0's
            cfg = dataclasses.replace(cfg, out=broadcast_object(world, cfg.out))
        return _train(cfg, resume, device, world, started)


def _train(cfg: TrainConfig, resume: bool, device: torch.device, world: World, started: float) -> dict | None:
    out = Path(cfg.out)
    if not resume and (out / CHECKPOINT).exists():
        raise InstretError(f"{out} already holds a run; add --resume to continue it, or choose another --out")
    data = load_train_data(cfg, world)
    if len(data.train) < 2:
        raise InstretError("need at least 2 training images")
    if cfg.loss == "nce" and cfg.nce_k >= len(data.train):
        log(
            f"note: --nce-k {cfg.nce_k} noise samples for {len(data.train)} images: the noise repeats images; "
            f"the exact softmax (--loss softmax) costs no more here"
        )
    if cfg.batch_size < 2 * world.size:
        raise InstretError(
            f"--batch-size {cfg.batch_size} is too small for {world.size} processes (2 images each at least)"
        )
    ckpt = load_checkpoint(out / CHECKPOINT) if resume and (out / CHECKPOINT).exists() else None
    if ckpt is not None and ckpt["bank"]["features"].shape[0] != len(data.train):
        raise InstretError(
            f"{out}: the checkpoint's bank has {ckpt['bank']['features'].shape[0]} rows but the data "
            f"now has {len(data.train)} images; the data changed since the run began"
        )
    # Only now, with every refusal behind us, does anything on disk change (rank 0 writes).
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    budgeted = cfg.time_budget is not None and ckpt is None  # a resumed run finishes the epochs it planned
    most = cfg.epochs  # with a time budget, --epochs is the most it may plan
    if budgeted:  # until the first steps are timed, one epoch (the schedule starts at lr either way)
        cfg = dataclasses.replace(cfg, epochs=1)

    def start(cfg: TrainConfig, ckpt: dict | None) -> Trainer:
        trainer = Trainer(cfg, data, device, checkpoint=ckpt, world=world)
        if budgeted:
            trainer.deadline, trainer.max_epochs = started + 60 * cfg.time_budget, most
        return trainer

    trainer = start(cfg, ckpt)
    if ckpt is not None:
        log(f"resuming {out} after epoch {trainer.epoch}/{cfg.epochs}")  # log(): rank 0 speaks for all
    processes = f", {world.size} processes" if world.distributed else ""
    length = f"epochs planned for a {cfg.time_budget:g}-minute budget" if budgeted else plural(cfg.epochs, "epoch")
    log(
        f"training {cfg.arch} at {cfg.image_size} px on {data.name}: {len(data.train)} images, {length}, "
        f"{cfg.loss} loss, device {device}{processes}, run folder {out}"
    )
    try:
        final = trainer.fit()
    except SeveralViews as found:
        log(
            f"multi-view check after epoch {found.epoch}: {views_text(found.share, found.confident, found.threshold)}"
            f": several views of each thing. Training starts again "
            f"to tell things apart across their views (--multi-view on: {multi_view_text()}; "
            f"--multi-view off keeps the recipe)"
        )
        cfg = dataclasses.replace(cfg, multi_view="on", epochs=1 if budgeted else cfg.epochs)
        if world.main:  # the first start's checkpoint goes first: a resume then starts again too
            (out / CHECKPOINT).unlink(missing_ok=True)
            atomic_write_text(out / "config.json", json.dumps({**cfg.to_dict(), "epochs": most}, indent=2) + "\n")
        final = start(cfg, None).fit()
    if world.main:
        index_the_run(cfg, data, device)
    return final


def index_the_run(cfg: TrainConfig, data: TrainData, device: torch.device) -> None:
    """Train, then query with no step between: a --data run indexes its folder with the run's
    encoder and names the commands to try; the embedded digits get their first search."""
    out = Path(cfg.out)
    if cfg.data is not None:
        # The run's own index follows the run's latest encoder (rebuild=None: re-encoded when the
        # encoder changed, left as it is when a finished run is resumed).
        build_index(
            cfg.data,
            out,
            out / "index",
            workers=cfg.workers,
            device=str(device),
            rebuild=None,
            max_pixels=cfg.max_image_pixels,
        )
        index = SearchIndex(out / "index")
        first = Path(index.manifest["root"]) / index.files(limit=1)[0][1]  # an image the index holds: a sample query
        index.close()
        log(next_commands(out, first))
    elif cfg.dataset == "digits":
        first_search(data, out, cfg.workers, str(device))


def _resumed_config(given: dict) -> TrainConfig:
    out = given.get("out")
    if out is None:
        raise InstretError("--resume needs --out RUN_DIR (the run folder to continue)")
    path = Path(out) / "config.json"
    if not path.is_file():
        raise InstretError(f"--resume: {out} is not a run folder (no config.json)")
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text())).to_dict()
    except ValueError as e:
        raise InstretError(f"--resume: cannot read {path}: {e}") from None
    ignored = sorted(k for k, v in given.items() if k not in RESUMABLE and k in saved and v != saved[k])
    if ignored:
        log(f"resume keeps the run's saved configuration; ignoring: {', '.join(ignored)}")
    saved.update({k: v for k, v in given.items() if k in RESUMABLE and v is not None})
    return TrainConfig.from_dict(saved)
