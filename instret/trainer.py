"""The Instance Discrimination training loop, with checkpoints, exact resume and metrics.

    images -> augment -> encoder -> f;  f, bank -> loss -> backward -> step;  bank.update(idx, f)
    epoch end: bank -> FeatureIndex -> weighted kNN -> metrics row -> checkpoint, encoder.pt

A run folder holds config.json, checkpoint.pt (everything needed to continue bit-for-bit),
metrics.jsonl (rewritten from the checkpoint's history, so the two never disagree),
encoder.pt (the slim export) and, after the last epoch, final.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from instret import losses, neighbours
from instret.augment import Augment, channel_stats
from instret.bank import MemoryBank
from instret.config import (
    DEFAULT_EPOCHS,
    FORMAT_VERSION,
    MULTI_VIEW,
    PAPER_EPOCHS,
    TrainConfig,
    multi_view_text,
    with_presets,
)
from instret.data import ImageSet, TrainData, auto_image_size, load_train_data
from instret.device import fast_cpu_bf16, resolve_device
from instret.distributed import (
    SINGLE,
    World,
    all_sum,
    broadcast_object,
    gather_rows,
    global_batch_norm,
    process_group,
    world_from_env,
)
from instret.encoder import Encoder, calibrated_copy, embed_batches, export_encoder, resolve_arch
from instret.errors import InstretError
from instret.imagesource import ResidentImages, StreamedImages, chunks, evenly_spaced
from instret.knn import FeatureIndex, knn_evaluate
from instret.monitor import label_free_metrics
from instret.progress import Progress, clock, log, plural
from instret.storage import atomic_torch_save, atomic_write_text, load_torch_file, remove_stale_temps

CHECKPOINT = "checkpoint.pt"
STATS_SAMPLE = 10000  # images the normalisation statistics are measured on
MONITOR_SAMPLE = 512  # images the label-free monitor views each epoch, at most
PROBE_STEPS = 10  # steps timed in the first epoch before a time budget plans the epochs


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Step schedule: lr * gamma^(number of milestones passed); milestones are fractions of epochs.
    Cosine: lr * (1 + cos(pi * epoch / epochs)) / 2."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    passed = sum(epoch >= round(m * cfg.epochs) for m in cfg.lr_milestones)
    return cfg.lr * cfg.lr_gamma**passed


def speed_options(cfg: TrainConfig, device: torch.device) -> dict:
    """What `None` means for each speed option on this device (README: "Speed options")."""
    cuda = device.type == "cuda"
    bf16 = torch.cuda.is_bf16_supported() if cuda else fast_cpu_bf16()
    return {
        "amp": bf16 if cfg.amp is None else cfg.amp,
        "compile": cfg.compile,
        "fused_optimizer": cuda if cfg.fused_optimizer is None else cfg.fused_optimizer,
        "channels_last": cfg.channels_last,
    }


def monitor_sample(images: int) -> int:
    """Training images the per-epoch monitor views (BatchNorm re-estimation, the label-free
    figures): an eighth of the set, 128 to MONITOR_SAMPLE. Three forward passes each, against
    about four an image for an epoch: a tenth of an epoch's work. A fixed 512 made the monitor
    two thirds of an epoch on the 1,438 digits."""
    return min(MONITOR_SAMPLE, max(128, images // 8))


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
            cfg = dataclasses.replace(cfg, image_size=sample.shape[-1] if sample is not None else 32)
        self.cfg, self.data, self.device, self.world = cfg, data, device, world
        self.deadline: float | None = None  # time.perf_counter() by which a time-budgeted run ends
        self.max_epochs: int | None = None  # the most epochs a time budget may plan
        torch.manual_seed(cfg.seed)
        self.speed = speed_options(cfg, device)
        if device.type == "cuda":
            # The batch shape is fixed: cuDNN picks the fastest convolution kernels once. They are
            # not deterministic, so a resumed GPU run matches an uninterrupted one closely, not
            # bit for bit (README: "Interruption").
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
        # Neighbourhood discovery: each row's positives (n x K, -1 unused; None before the first
        # round), the rounds run, whether growth stopped, and each row's cosine between its last
        # augmented view and its bank row, which calibrates the mutual rule.
        self.neighbourhoods: torch.Tensor | None = None
        self.rounds = 0
        self.rounds_stopped = False
        self.view_cosine = torch.zeros(n, device=device)
        self.round_row: dict = {}
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

    def confident_share(self, sims: torch.Tensor | None = None, ids: torch.Tensor | None = None):
        """(share of rows with a confident neighbour, the cosine that makes one): mutual among
        their neighbour_k nearest rows and as close as two views of one image reach half the time."""
        cfg = self.cfg
        if sims is None:
            sims, ids = neighbours.nearest_rows(self.bank.features, max(cfg.neighbour_k, 10))
        threshold = float(self.view_cosine.quantile(1 - cfg.neighbour_quantile))
        confident = neighbours.mutual_neighbourhoods(sims, ids, cfg.neighbour_k, threshold)
        return float((confident >= 0).any(dim=1).float().mean()), threshold

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
        if self.neighbourhoods is not None:
            loss = losses.neighbourhood_loss(f, bank, idx, self.neighbourhoods[idx], self.tau)
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
            self.view_cosine[idx] = (everyone * self.bank.features[idx]).sum(dim=1)
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
        """Run the neighbourhood round due before this epoch (neighbours.round_epochs): mine the
        bank's FAISS mirror, choose each row's positives by the rule, and refuse a round whose
        links would join over half the set (growth then stops, and the run says so)."""
        cfg = self.cfg
        if cfg.neighbourhoods == "off" or self.rounds_stopped:
            return
        due = sum(
            self.epoch >= e for e in neighbours.round_epochs(cfg.epochs, cfg.neighbour_rounds, cfg.neighbour_start)
        )
        if self.rounds < due:  # one round an epoch at most: rounds due together follow one another
            t = time.perf_counter()
            self.rounds += 1
            share = neighbours.curriculum_share(self.rounds, cfg.neighbour_rounds)
            sims, ids = neighbours.nearest_rows(self.bank.features, max(cfg.neighbour_k, 10))
            grouped, threshold = self.confident_share(sims, ids)
            if cfg.neighbourhoods == "anchors":
                found = neighbours.anchor_neighbourhoods(sims, ids, share, cfg.neighbour_k, self.tau)
            else:
                found = neighbours.mutual_neighbourhoods(sims, ids, cfg.neighbour_k, threshold, share)
            figures = neighbours.round_figures(found, self.neighbourhoods)
            refused = figures["neighbourhood_largest"] > neighbours.MAX_COMPONENT
            if refused:
                self.rounds_stopped = True
                log(
                    f"note: neighbourhood round {self.rounds} would link {figures['neighbourhood_largest']:.0%} of "
                    f"the images into one group; keeping the last round's neighbourhoods and growing no more"
                )
            else:
                self.neighbourhoods = found
            self.round_row = {
                "neighbourhood_round": self.rounds,
                "neighbourhood_share": share,
                "neighbourhood_threshold": threshold,
                "neighbourhood_confident": grouped,
                **figures,
                "neighbourhood_refused": refused,
                "neighbourhood_seconds": round(time.perf_counter() - t, 3),
            }
            log(
                f"neighbourhood round {self.rounds}/{cfg.neighbour_rounds}: {figures['neighbourhood_rows']} of "
                f"{len(found)} images have neighbours, mean size {figures['neighbourhood_size']:.2f}, largest "
                f"group {figures['neighbourhood_largest']:.1%}, agreement {figures['neighbourhood_agreement']:.2f}"
                + f"; {grouped:.0%} have a confident neighbour (cosine >= {threshold:.3f})"
            )

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

    # --- evaluation -------------------------------------------------------------------

    def eval_model(self, sample: int = MONITOR_SAMPLE) -> torch.nn.Module:
        """The model as evaluated and exported: BatchNorm statistics of clean training images
        (at most MONITOR_SAMPLE images every epoch keep the monitor cheap; the final export uses more)."""
        sample = evenly_spaced(len(self.train_images), sample)
        return calibrated_copy(self.model, self.train_images.batches(chunks(sample)), self.mean, self.std)

    @torch.no_grad()
    def label_free(self, model: torch.nn.Module, sample: int = MONITOR_SAMPLE) -> dict:
        """The label-free monitor (instret.monitor) on an evenly spaced sample of the training
        images, with views from a generator of its own: the run's random stream is untouched."""
        ids = evenly_spaced(len(self.train_images), sample)
        images = next(self.train_images.batches([ids]))
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 100_003 + self.epoch)
        model.eval()
        views = model(self.augment(images, generator).contiguous(memory_format=torch.channels_last))
        clean = embed_batches(model, images.split(256), self.mean, self.std)
        metrics = label_free_metrics(views.float(), clean.float(), ids.to(self.device), self.bank.features)
        return {**metrics, "ln_n": math.log(len(self.train_images))}

    def knn(self, keys: torch.Tensor, model: torch.nn.Module, limit: int = 0) -> dict:
        """Weighted kNN top-1/top-5 against `keys` (the bank, or re-embedded training images),
        for the held-out images, or without a held-out split for the keys themselves (leave one
        out); evenly spaced `limit` of them when limit > 0. "knn_engine" names the search."""
        train = self.data.train
        index = FeatureIndex()
        index.sync(keys)
        num_classes = len(train.classes)
        common = dict(num_classes=num_classes, k=self.cfg.knn_k, sigma=self.cfg.tau)
        if self.eval_images is None:
            # At 1.28 M images the whole bank against itself is ~420 TFLOP: a sample of it, too.
            pick = evenly_spaced(len(keys), limit) if 0 < limit < len(keys) else torch.arange(len(keys))
            queries, labels = keys[pick.to(keys.device)], train.labels[pick]
            found = knn_evaluate(index, train.labels, queries, labels, leave_one_out=True, key_rows=pick, **common)
        else:
            labels, pick = self.data.eval.labels, torch.arange(len(self.eval_images))
            if 0 < limit < len(pick):
                # Embedding the held-out images is most of the monitor's cost: a sample keeps it small.
                pick = torch.linspace(0, len(pick) - 1, limit).long()
                labels = labels[pick]
            queries = embed_batches(model, self.eval_images.batches(chunks(pick)), self.mean, self.std)
            found = knn_evaluate(index, train.labels, queries, labels, **common)
        return {**found, "knn_engine": index.engine}

    def final_eval(self, model: torch.nn.Module | None = None) -> dict:
        """kNN of the final model (eval_model with a 4,096-image sample, unless given) as the
        paper measures it: the training images re-embedded with the test transform (docs/method.md);
        {} without labels."""
        if not self.data.labelled:
            return {}
        model = self.eval_model(sample=4096) if model is None else model
        every = chunks(torch.arange(len(self.train_images)))
        return self.knn(embed_batches(model, self.train_images.batches(every), self.mean, self.std), model)

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
            "neighbourhoods": self.neighbourhoods,
            "rounds": self.rounds,
            "rounds_stopped": self.rounds_stopped,
            "view_cosine": self.view_cosine,
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
        if "rounds" in ckpt:  # checkpoints before neighbourhood discovery have none
            nb = ckpt["neighbourhoods"]
            self.neighbourhoods = None if nb is None else nb.to(self.device)
            self.rounds, self.rounds_stopped = ckpt["rounds"], ckpt["rounds_stopped"]
            self.view_cosine.copy_(ckpt["view_cosine"])
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
        """encoder.pt: the evaluated model with its normalisation (what index and query load)."""
        export_encoder(model, self.out / "encoder.pt", self.mean, self.std)

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
        row = self.history[-1]
        t = time.perf_counter()
        sample = monitor_sample(len(self.train_images))
        eval_model = self.eval_model(sample)
        row.update(rounded(self.label_free(eval_model, sample)))
        if self.data.labelled:
            knn_start = time.perf_counter()
            row.update(rounded(self.knn(self.bank.features, eval_model, self.cfg.monitor_size)))
            row["knn_seconds"] = round(time.perf_counter() - knn_start, 3)
        row["monitor_seconds"] = round(time.perf_counter() - t, 3)
        return eval_model

    def fit(self) -> dict | None:
        """Train to cfg.epochs; returns final.json's content. With several processes, only rank 0
        evaluates and writes; the others return None (their bank and weights are the same)."""
        start, first = time.perf_counter(), self.epoch
        while self.epoch < self.cfg.epochs:
            if self.views_check_due():
                share, threshold = self.confident_share()
                if share >= neighbours.GROUPED:
                    raise SeveralViews(share, threshold, self.epoch)
                log(
                    f"multi-view check after epoch {self.epoch}: {share:.0%} of the images have a confident "
                    f"neighbour (cosine >= {threshold:.3f}), under {neighbours.GROUPED:.0%}: training goes on as it is"
                )
                self.round_row["views_confident"] = share
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
                log(_format_row(row, self.cfg.epochs) + f"  {clock(per_epoch * (self.cfg.epochs - self.epoch))} left")
        if not self.world.main:
            return None
        model = self.eval_model(sample=4096)
        self.export(model)
        final = {"epochs": self.epoch, "train_seconds": round(sum(r["seconds"] for r in self.history), 1)}
        final.update(rounded(self.final_eval(model)))
        atomic_write_text(self.out / "final.json", json.dumps(final, indent=2) + "\n")
        return final


class SeveralViews(Exception):
    """The multi-view check found several views of each thing: the run starts again with
    multi_view on (raised by Trainer.fit, handled by train)."""

    def __init__(self, share: float, threshold: float, epoch: int):
        super().__init__(share, threshold, epoch)
        self.share, self.threshold, self.epoch = share, threshold, epoch


def rounded(figures: dict) -> dict:
    """Figures for metrics.jsonl and final.json: floats to 4 places, words (knn_engine) as they are."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def _format_row(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}"
    if "ln_n" in row:
        text += f" (ln n {row['ln_n']:.2f})"
    text += f"  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s"
    if "instance_recall@1" in row:
        text += (
            f"  instance R@1 {row['instance_recall@1']:.3f}  align {row['alignment']:.3f}"
            f"  unif {row['uniformity']:.2f}  pair cos {row['mean_pair_cosine']:.3f}"
        )
    if "knn_top1" in row:
        text += f"  kNN top-1 {row['knn_top1']:.4f} top-5 {row['knn_top5']:.4f}"
    return text


def load_checkpoint(path: Path) -> dict:
    return load_torch_file(path, "checkpoint", ("config", "model", "bank", "epoch"), FORMAT_VERSION)


def resolve(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill in what `auto` and `None` mean, so config.json records what actually ran."""
    d = cfg.to_dict()
    d["arch"] = resolve_arch(cfg.arch, device)
    if cfg.data is not None:
        d["dataset"] = None  # a folder: no built-in dataset is used
    if cfg.image_size is None:
        d["image_size"] = auto_image_size(cfg.data, device.type) if cfg.data is not None else 32
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
            f"multi-view check after epoch {found.epoch}: {found.share:.0%} of the images have a confident "
            f"neighbour (cosine >= {found.threshold:.3f}): several views of each thing. Training starts again "
            f"to tell things apart across their views (--multi-view on: {multi_view_text()}; "
            f"--multi-view off keeps the recipe)"
        )
        cfg = dataclasses.replace(cfg, multi_view="on", epochs=1 if budgeted else cfg.epochs)
        if world.main:  # the first start's checkpoint goes first: a resume then starts again too
            (out / CHECKPOINT).unlink(missing_ok=True)
            atomic_write_text(out / "config.json", json.dumps({**cfg.to_dict(), "epochs": most}, indent=2) + "\n")
        final = start(cfg, None).fit()
    if world.main and cfg.data is not None:  # train then query, with no extra step
        from instret.indexer import build_index

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
        from instret.demo import next_commands
        from instret.index import SearchIndex

        index = SearchIndex(out / "index")
        first = Path(index.manifest["root"]) / index.files(limit=1)[0][1]  # an image the index holds: a sample query
        index.close()
        log(next_commands(out, first))
    elif world.main and cfg.dataset == "digits":
        from instret.demo import first_search

        first_search(data, out, cfg.workers, str(device))
    return final


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
