"""The Instance Discrimination training loop, with checkpoints, exact resume and metrics.

    images -> augment -> encoder -> f;  f, bank -> loss -> backward -> step;  bank.update(idx, f)
    epoch end: bank -> FeatureIndex -> weighted kNN -> metrics row -> checkpoint, encoder.pt

A run folder holds config.json, checkpoint.pt (everything needed to continue bit-for-bit),
metrics.jsonl (rewritten from the checkpoint's history, so the two never disagree),
encoder.pt (the slim export) and, after the last epoch, final.json.

Around the loop: instret.run resolves the configuration, checks a resume and indexes the run;
instret.evaluation measures each epoch; instret.discovery carries the neighbourhood rounds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from instret import evaluation, losses, neighbours
from instret.augment import Augment, channel_stats
from instret.bank import MemoryBank
from instret.config import (
    FORMAT_VERSION,
    MULTI_VIEW,
    TrainConfig,
)
from instret.data import ImageSet, TrainData
from instret.defaults import IMAGE_SIZE
from instret.device import fast_cpu_bf16
from instret.discovery import NeighbourhoodDiscovery
from instret.distributed import (
    SINGLE,
    World,
    all_sum,
    broadcast_object,
    gather_rows,
    global_batch_norm,
)
from instret.encoder import Encoder, save_encoder
from instret.errors import InstretError
from instret.imagesource import ResidentImages, StreamedImages, chunks, evenly_spaced
from instret.progress import Progress, clock, log
from instret.storage import atomic_torch_save, atomic_write_text, load_torch_file

CHECKPOINT = "checkpoint.pt"
STATS_SAMPLE = 10000  # images the normalisation statistics are measured on
PROBE_STEPS = 10  # steps timed in the first epoch before a time budget plans the epochs


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Step schedule: lr * gamma^(number of milestones passed); milestones are fractions of epochs.
    Cosine: lr * (1 + cos(pi * epoch / epochs)) / 2."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.lr_milestones)
    return cfg.lr * cfg.lr_gamma**passed


def speed_options(cfg: TrainConfig, device: torch.device) -> dict:
    """What `None` means for each speed option on this device (docs/training.md: "Speed options")."""
    cuda = device.type == "cuda"
    bf16 = torch.cuda.is_bf16_supported() if cuda else fast_cpu_bf16()
    return {
        "amp": bf16 if cfg.amp is None else cfg.amp,
        "compile": cfg.compile,
        "fused_optimizer": cuda if cfg.fused_optimizer is None else cfg.fused_optimizer,
        "channels_last": cfg.channels_last,
    }


def batches(perm: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive slices of a permutation; a trailing batch of one joins the one before (BatchNorm)."""
    parts = list(perm.split(batch_size))
    if len(parts) > 1 and len(parts[-1]) < 2:
        last = parts.pop()
        parts[-1] = torch.cat([parts[-1], last])
    return parts


class Trainer:
    """Holds the state of one run. Its parts compose: `train_epoch()` trains one epoch (and
    counts it), `monitor()` evaluates it, `save()` writes the checkpoint and metrics to
    cfg.out, `export()` an encoder, `final_eval()` the final kNN; `fit()` is the loop over
    them that `instret train` runs."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: TrainData,
        device: torch.device,
        checkpoint: dict | None = None,
        world: World = SINGLE,
    ):
        if cfg.image_size is None:  # data prepared by the caller: the size it was decoded at
            sample = data.train.images
            cfg = dataclasses.replace(cfg, image_size=sample.shape[-1] if sample is not None else IMAGE_SIZE)
        self.cfg, self.data, self.device, self.world = cfg, data, device, world
        self.deadline: float | None = None  # time.perf_counter() by which a time-budgeted run ends
        self.max_epochs: int | None = None  # the most epochs a time budget may plan
        torch.manual_seed(cfg.seed)
        self.speed = speed_options(cfg, device)
        if device.type == "cuda":
            # The batch shape is fixed: cuDNN picks the fastest convolution kernels once. They are
            # not deterministic, so a resumed GPU run matches an uninterrupted one closely, not
            # bit for bit (docs/robustness.md: "Interruption").
            torch.backends.cudnn.benchmark = True
        # channels_last: faster convolutions on CPUs and on tensor-core GPUs alike.
        self.memory_format = torch.channels_last if self.speed["channels_last"] else torch.contiguous_format
        self.model = Encoder(cfg.arch, cfg.low_dim, cfg.image_size).to(device, memory_format=self.memory_format)
        forward = self.model
        if world.distributed:
            # Statistics of the global batch, and gradients averaged over the processes (DDP);
            # GlobalBatchNorm keeps the running statistics equal, so DDP need not copy them.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers: still the way
                forward = torch.nn.parallel.DistributedDataParallel(
                    global_batch_norm(self.model),
                    device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False,
                )
        self.forward = torch.compile(forward) if self.speed["compile"] else forward
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        n = len(data.train)
        self.bank = MemoryBank(n, cfg.low_dim, device, generator=self.generator)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            fused=self.speed["fused_optimizer"],
        )
        self.train_images = self.image_source(data.train)
        self.eval_images = self.image_source(data.eval) if data.eval is not None else None
        self.mean, self.std = channel_stats(self.train_images.batches(chunks(evenly_spaced(n, STATS_SAMPLE))))
        self.augment = Augment(
            cfg.image_size,
            self.mean,
            self.std,
            scale=cfg.crop_scale,
            jitter=cfg.jitter,
            hue=cfg.hue,
            grayscale_p=cfg.grayscale_p,
            flip=cfg.flip,
            rotate=cfg.rotate,
            erase_p=cfg.erase_p,
            blur_p=cfg.blur_p,
        )
        self.epoch = 0  # epochs finished
        self.nce_z: float | None = None
        self.discovery = NeighbourhoodDiscovery(n, device)
        self.round_row: dict = {}  # what the epoch's round and checks add to its metrics row
        self.history: list[dict] = []
        if cfg.multi_view == "on":  # training for several views of each thing
            self.augment.hue, self.augment.grayscale_p = MULTI_VIEW["hue"], MULTI_VIEW["grayscale_p"]
            self.augment.scale = MULTI_VIEW["crop_scale"]
        if checkpoint is not None:
            self.load_state(checkpoint)
        elif cfg.bank_init == "features":
            self.init_bank_from_features()

    @torch.no_grad()
    def init_bank_from_features(self, batch_size: int = 512) -> None:
        """Start the bank at the untrained network's features of one augmented view per image.

        With random rows, the first epoch pulls every feature towards an unrelated random
        target while the rows already visited all look alike; the features then chase their
        own mean and learn little (measured on 10k CIFAR images, 4 epochs: kNN 0.36 random,
        0.50 features). Not in the paper, hence not the default.
        """
        ids = chunks(torch.arange(len(self.train_images)), batch_size)
        for idx, images in zip(ids, self.train_images.batches(ids)):
            # The plain model: under no_grad the compiled one would compile a second graph.
            self.bank.features[idx.to(self.device)] = F.normalize(
                self.encode(self.augment(images, self.generator), self.model), dim=1
            )

    @property
    def tau(self) -> float:
        """The loss's temperature: MULTI_VIEW's once training turned to several views of a thing."""
        return MULTI_VIEW["tau"] if self.cfg.multi_view == "on" else self.cfg.tau

    def views_share(self) -> tuple[float, float, float]:
        """The multi-view check (NeighbourhoodDiscovery.views_share): (share of rows with a
        confident neighbour that is not a copy, share with any, the cosine that makes one)."""
        return self.discovery.views_share(self.cfg, self.bank.features, self.data.train.paths)

    def views_check_due(self) -> bool:
        """multi_view auto: at neighbours.views_check_epoch, if it falls early enough in the run
        that training again from the start is worth it."""
        at = neighbours.views_check_epoch(len(self.train_images))
        return self.cfg.multi_view == "auto" and self.epoch == at <= neighbours.VIEWS_CHECK_SHARE * self.cfg.epochs

    def image_source(self, images: ImageSet) -> ResidentImages | StreamedImages:
        if images.images is not None:
            return ResidentImages(images.images, self.device)
        cfg = self.cfg
        return StreamedImages(images.paths, cfg.image_size, self.device, cfg.workers, cfg.max_image_pixels)

    # --- one step and one epoch -----------------------------------------------------

    def loss(self, f: torch.Tensor, idx: torch.Tensor, rows: slice, batch: int) -> torch.Tensor:
        """The loss of this process's rows of a global batch of `batch` (all of it in one process)."""
        cfg, bank = self.cfg, self.bank.features
        found = self.discovery.neighbourhoods
        if found is not None:
            loss = losses.neighbourhood_loss(f, bank, idx, found[idx], self.tau)
        elif cfg.loss == "softmax":
            loss = losses.softmax_loss(f, bank, idx, self.tau)
        else:
            noise = losses.nce_noise(len(bank), batch, cfg.nce_k, self.generator)[rows]
            if self.nce_z is None:  # estimated once, from the first batch, then frozen
                self.nce_z = losses.estimate_nce_z(f, bank, noise, cfg.tau, lambda t: all_sum(self.world, t))
            loss = losses.nce_loss(f, bank, idx, noise, cfg.tau, self.nce_z)
        if cfg.prox_lambda > 0:
            loss = loss + losses.proximal_term(f, bank[idx], cfg.prox_lambda)
        return loss

    def encode(self, x: torch.Tensor, forward: torch.nn.Module | None = None) -> torch.Tensor:
        """Training-time forward with the speed options; features come back in float32.
        forward: another module than the (compiled, distributed) training one."""
        x = x.contiguous(memory_format=self.memory_format)
        if forward is None and self.speed["compile"]:
            # The batch size varies (the short last batch): one graph for every size, compiled
            # once, rather than a second compilation at the end of the first epoch.
            torch._dynamo.maybe_mark_dynamic(x, 0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.speed["amp"]):
            return (forward or self.forward)(x).float()

    def step(self, idx: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """One step on the global batch idx, of which this process holds `images` (its rows;
        fetched when not given); returns this process's share of the batch's mean loss."""
        rows, batch = self.world.rows(len(idx)), len(idx)
        if images is None:
            images = next(self.train_images.batches([idx[rows]]))
        f = self.encode(self.augment(images, self.generator, rows, batch))
        loss = self.loss(f, idx[rows], rows, batch)
        share = (rows.stop - rows.start) / batch
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over the processes: scaled so that the average is the
        # gradient of the global batch's mean loss (share = 1 in one process).
        (loss * (share * self.world.size)).backward()
        self.optimizer.step()
        everyone = gather_rows(self.world, f.detach(), batch)
        if self.cfg.neighbourhoods != "off" or self.cfg.multi_view == "auto":
            self.discovery.view_cosine[idx] = (everyone * self.bank.features[idx]).sum(dim=1)
        self.bank.update(idx, everyone, self.cfg.bank_momentum)
        return loss.detach() * share

    def train_epoch(self, max_steps: int | None = None) -> dict:
        """Train one epoch (its first max_steps batches only, for a smoke test); it is then
        counted (self.epoch) and its row is in self.history."""
        self.discover_neighbourhoods()
        cfg = self.cfg
        lr = lr_at(self.epoch, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        perm = torch.randperm(len(self.train_images), generator=self.generator, device=self.device)
        parts = batches(perm, cfg.batch_size)[:max_steps]
        seen = sum(len(idx) for idx in parts)
        mine = self.train_images.batches([idx[self.world.rows(len(idx))] for idx in parts])
        progress = Progress(
            len(parts), f"epoch {self.epoch + 1}/{cfg.epochs}", enabled=None if self.world.main else False
        )
        start = time.perf_counter()
        total = torch.zeros((), device=self.device)  # accumulated on the device: no per-step sync
        for i, (idx, images) in enumerate(zip(parts, mine)):
            loss = self.step(idx, images)
            total += loss * len(idx)
            progress.update(1, f"loss {loss.item():.4f}" if progress.due() else None)
            if i + 1 == PROBE_STEPS and self.epoch == 0 and self.deadline is not None:
                # A first estimate of an epoch (plus 10 % for the monitor), refined after each epoch.
                self.plan(start, (time.perf_counter() - start) / PROBE_STEPS * len(parts) * 1.1, in_progress=True)
        mean_loss = float(all_sum(self.world, total)) / seen
        seconds = time.perf_counter() - start
        progress.close()
        if not math.isfinite(mean_loss):
            raise InstretError(
                f"the loss became {mean_loss} in epoch {self.epoch + 1}; try a lower --lr (the last checkpoint is kept)"
            )
        self.epoch += 1
        self.history.append(
            {
                "epoch": self.epoch,
                "loss": mean_loss,
                "lr": lr,
                "seconds": round(seconds, 3),
                "images_per_s": round(seen / seconds, 1),
                **self.round_row,
            }
        )
        self.round_row = {}
        return self.history[-1]

    def discover_neighbourhoods(self) -> None:
        """The neighbourhood round due before this epoch, its figures into the epoch's row."""
        self.round_row.update(self.discovery.round_due(self.cfg, self.epoch, self.bank.features, self.tau))

    def plan(self, epoch_start: float, per_epoch: float, in_progress: bool) -> None:
        """Set cfg.epochs to what fits before the deadline: the epochs finished, plus as many of
        per_epoch seconds from epoch_start as remain once the end (final evaluation, the index of
        a --data run) is set aside; an epoch in progress always finishes. The schedule (lr_at)
        follows the new count."""
        reserve = 0.4 * per_epoch + 0.001 * len(self.train_images) + 1.0  # a forward pass and decoding
        fit = int((self.deadline - epoch_start - reserve) // max(per_epoch, 1e-6))
        epochs = self.epoch + max(1 if in_progress else 0, fit)
        epochs = broadcast_object(self.world, max(1, min(epochs, self.max_epochs or epochs)))  # rank 0's plan
        self.cfg = dataclasses.replace(self.cfg, epochs=epochs)

    # --- persistence ------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "bank": self.bank.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "nce_z": self.nce_z,
            **self.discovery.state(),
            "history": self.history,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.bank.load_state_dict(ckpt["bank"])
        try:
            self.generator.set_state(ckpt["generator"])
        except RuntimeError:
            # Saved on another kind of device (a CUDA generator's state is 16 bytes, a CPU one's
            # 5,056): its stream cannot continue here. Start a new one, fixed by seed and epoch.
            self.generator.manual_seed(self.cfg.seed * 1_000_003 + ckpt["epoch"])
            log(
                f"note: this run's checkpoint was written on another kind of device than {self.device}; its "
                f"random stream restarts from a fixed seed, so the run continues but is not bit for bit "
                f"what it would have been"
            )
        torch.set_rng_state(ckpt["torch_rng"])
        self.epoch, self.nce_z, self.history = ckpt["epoch"], ckpt["nce_z"], list(ckpt["history"])
        self.discovery.load_state(ckpt)
        self.mean, self.std = tuple(ckpt["mean"]), tuple(ckpt["std"])
        self.augment.mean, self.augment.std = self.mean, self.std

    @property
    def out(self) -> Path:
        if self.cfg.out is None:
            raise InstretError("this run has no folder to write to (TrainConfig.out)")
        return Path(self.cfg.out)

    def save(self) -> None:
        """The checkpoint, then what is derived from it: metrics.jsonl (and config.json, whose
        epochs a time budget may have changed)."""
        atomic_torch_save(self.state(), self.out / CHECKPOINT)
        if self.deadline is not None:
            atomic_write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    def export(self, model: torch.nn.Module) -> None:
        """encoder.pt: the evaluated model with its normalisation (what index and query load) and,
        trained for several views, the weight of the colour signature searched beside it."""
        colour = MULTI_VIEW["colour_weight"] if self.cfg.multi_view == "on" else 0.0
        save_encoder(model, self.out / "encoder.pt", self.mean, self.std, colour)

    def monitor_due(self) -> bool:
        """Every epoch; under a time budget, where the monitor would take over a tenth of the
        time (short epochs), every k-th epoch and the last, k from the last monitor's cost."""
        rows = [r for r in self.history if "monitor_seconds" in r]
        if self.deadline is None or not rows or self.epoch >= self.cfg.epochs:
            return True
        last = rows[-1]
        every = math.ceil(last["monitor_seconds"] / max(0.1 * last["seconds"], 1e-6))
        return self.epoch - last["epoch"] >= every

    def monitor(self) -> torch.nn.Module:
        """Add the monitor's figures to the last epoch's row; returns the evaluated model."""
        return evaluation.monitor(self)

    def final_eval(self, model: torch.nn.Module | None = None) -> dict:
        """The final kNN (instret.evaluation.final_knn); {} without labels."""
        return evaluation.final_knn(self, model)

    def fit(self) -> dict | None:
        """Train to cfg.epochs; returns final.json's content. With several processes, only rank 0
        evaluates and writes; the others return None (their bank and weights are the same)."""
        start, first = time.perf_counter(), self.epoch
        while self.epoch < self.cfg.epochs:
            if self.views_check_due():
                share, confident, threshold = self.views_share()
                if share >= neighbours.GROUPED:
                    raise SeveralViews(share, confident, threshold, self.epoch)
                log(
                    f"multi-view check after epoch {self.epoch}: {views_text(share, confident, threshold)}, "
                    f"under {neighbours.GROUPED:.0%}: training goes on as it is"
                )
                self.round_row.update(views_confident=share, views_confident_with_copies=confident)
            row = self.train_epoch()
            model = self.monitor() if self.world.main and self.monitor_due() else None
            # The mean over every epoch so far, monitors and saves included: the time left, and a
            # steady plan, so that the step schedule's milestones do not move back and forth.
            now = time.perf_counter()
            per_epoch = (now - start) / (self.epoch - first)
            if self.deadline is not None:  # every process plans (rank 0's plan is broadcast)
                self.plan(now, per_epoch, in_progress=False)
            if self.world.main:
                self.save()
                if model is not None:  # an epoch the monitor skipped keeps the last export
                    self.export(model)
                log(
                    evaluation.epoch_line(row, self.cfg.epochs)
                    + f"  {clock(per_epoch * (self.cfg.epochs - self.epoch))} left"
                )
        if not self.world.main:
            return None
        model = evaluation.evaluated_model(self, sample=4096)
        self.export(model)
        final = {"epochs": self.epoch, "train_seconds": round(sum(r["seconds"] for r in self.history), 1)}
        final.update(evaluation.rounded(self.final_eval(model)))
        atomic_write_text(self.out / "final.json", json.dumps(final, indent=2) + "\n")
        return final


class SeveralViews(Exception):
    """The multi-view check found several views of each thing: the run starts again with
    multi_view on (raised by Trainer.fit, handled by train)."""

    def __init__(self, share: float, confident: float, threshold: float, epoch: int):
        super().__init__(share, confident, threshold, epoch)
        self.share, self.confident, self.threshold, self.epoch = share, confident, threshold, epoch


def views_text(share: float, confident: float, threshold: float) -> str:
    """What the multi-view check found, as its line says it."""
    return (
        f"{confident:.0%} of the images have a confident neighbour (cosine >= {threshold:.3f}), "
        f"{share:.0%} one that is not a copy of the same picture"
    )


def load_checkpoint(path: Path) -> dict:
    return load_torch_file(path, "checkpoint", ("config", "model", "bank", "epoch"), FORMAT_VERSION)
