"""Training data: digits, CIFAR-10, or a folder of images.

A dataset is decoded once into an N x 3 x S x S uint8 tensor (CIFAR-10 is 150 MB), which
the trainer indexes by instance id and augments in batches on its own device. A folder too
large for that is streamed: decoded once to check every file and then dropped, keeping only
the readable paths, which the trainer decodes again a batch at a time (instret.imagesource).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instret.defaults import IMAGE_SIZE, PHOTO_IMAGE_SIZE
from instret.distributed import SINGLE, World, broadcast_object, gather_lists
from instret.errors import InstretError
from instret.images import is_image_file, iter_decoded, list_image_files
from instret.locations import image_folder
from instret.progress import log


@dataclass
class ImageSet:
    images: torch.Tensor | None  # N x 3 x S x S, uint8; None when streamed from `paths`
    labels: torch.Tensor | None = None  # N, int64; None when unlabelled
    classes: list[str] | None = None
    paths: list[str] | None = None  # where the images came from, when from files
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)


@dataclass
class TrainData:
    train: ImageSet
    eval: ImageSet | None  # a held-out split; None: kNN is leave-one-out on the bank
    name: str

    @property
    def labelled(self) -> bool:
        return self.train.labels is not None


def load_train_data(cfg, world: World = SINGLE) -> TrainData:
    if cfg.data is not None:
        return load_folder(cfg.data, cfg.image_size, cfg.workers, cfg.max_image_pixels, cfg.stream, world)
    if cfg.dataset == "digits":
        return load_digits(cfg.image_size)
    if cfg.dataset == "cifar10":
        return load_cifar10(cfg.data_root, cfg.download, cfg.image_size)
    raise InstretError(f"unknown dataset {cfg.dataset!r}")


def load_digits(size: int = 32) -> TrainData:
    """scikit-learn's 1,797 8x8 handwritten digits (offline), upsampled; every 5th is held out."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # N x 1 x 8 x 8 in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = x.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(d.target).long()
    classes = [str(c) for c in range(10)]
    held_out = torch.arange(len(labels)) % 5 == 4
    return TrainData(
        train=ImageSet(images[~held_out], labels[~held_out], classes),
        eval=ImageSet(images[held_out], labels[held_out], classes),
        name="digits",
    )


def load_cifar10(root: str, download: bool, size: int = 32) -> TrainData:
    try:
        from torchvision.datasets import CIFAR10
    except ModuleNotFoundError:
        raise InstretError("--dataset cifar10 needs torchvision (pip install torchvision)") from None

    sets = []
    for train in (True, False):
        try:
            ds = CIFAR10(root=root, train=train, download=download)
        except RuntimeError as e:
            if download:
                raise InstretError(f"could not download CIFAR-10 to {root}: {e}") from None
            raise InstretError(
                f"CIFAR-10 not found under {root}; add --download to fetch it, or pass --data-root"
            ) from None
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        if size != images.shape[-1]:
            images = _resize_uint8(images, size)
        sets.append(ImageSet(images, torch.tensor(ds.targets, dtype=torch.long), list(ds.classes)))
    return TrainData(train=sets[0], eval=sets[1], name="cifar10")


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8)


# --- folders -------------------------------------------------------------------------

EVAL_SPLIT_NAMES = ("test", "val")


def load_folder(
    root: str | Path,
    size: int,
    workers: int = 0,
    max_pixels: int | None = None,
    stream: bool | None = False,
    world: World = SINGLE,
) -> TrainData:
    """A folder of images: flat or one sub-folder per class; `train/` + `test/` (or `val/`) is a split.

    stream: keep only the paths of the readable files, not their pixels; None decides by size
    (streamed when the decoded set would take over a quarter of rank 0's memory). Streamed
    under several processes, each checks its share of the files and they exchange the lists.
    """
    split = functools.partial(
        read_folder, size=size, workers=workers, max_pixels=max_pixels, stream=stream, world=world
    )
    root = image_folder(root, "--data")
    train_dir = root / "train"
    eval_dir = next((root / n for n in EVAL_SPLIT_NAMES if (root / n).is_dir()), None)
    if train_dir.is_dir() and eval_dir is not None:
        train = split(train_dir)
        evalset = split(eval_dir, classes=train.classes)
        if (train.labels is None) != (evalset.labels is None):
            evalset = None  # one side labelled and the other not: no held-out accuracy
        return TrainData(train=train, eval=evalset, name=root.name)
    return TrainData(train=split(root), eval=None, name=root.name)


def find_classes(root: Path) -> list[str] | None:
    """Class names if root is in ImageFolder layout (no loose images, 2+ sub-folders with images)."""
    entries = sorted(root.iterdir())
    if any(e.is_file() and is_image_file(e) for e in entries):
        return None
    classes = [e.name for e in entries if e.is_dir() and list_image_files(e)]
    return classes if len(classes) >= 2 else None


def read_folder(
    root: Path,
    size: int,
    workers: int = 0,
    classes: list[str] | None = None,
    max_pixels: int | None = None,
    stream: bool | None = False,
    world: World = SINGLE,
) -> ImageSet:
    found = find_classes(root)
    if found is None:
        paths, labels, classes = list_image_files(root), None, None
    else:
        classes = classes or found
        index = {c: i for i, c in enumerate(classes)}
        paths, labels = [], []
        for c in found:
            if c not in index:
                raise InstretError(f"{root / c}: class {c!r} is not among the training classes")
            files = list_image_files(root / c)
            paths += files
            labels += [index[c]] * len(files)
    if not paths:
        raise InstretError(
            f"{root}: no image files found (looked for {', '.join(sorted({'.jpg', '.png', '.jpeg'}))}, ...)"
        )
    if stream is None:  # rank 0 decides: a collective follows, which every process must join
        stream = broadcast_object(world, too_large_to_hold(len(paths), size))
    if stream and world.distributed:
        mine = world.rows(len(paths))
        _, ok, skipped = decode_files(paths[mine], size, workers, max_pixels=max_pixels, keep=False)
        ok, skipped = gather_lists(world, [mine.start + i for i in ok]), gather_lists(world, skipped)
        images = None
    else:
        images, ok, skipped = decode_files(paths, size, workers, max_pixels=max_pixels, keep=not stream)
    if not ok:
        raise InstretError(f"{root}: none of the {len(paths)} image files could be read")
    report_skipped(skipped)
    keep = torch.tensor(ok, dtype=torch.long)
    return ImageSet(
        images=images,
        labels=None if labels is None else torch.tensor(labels, dtype=torch.long)[keep],
        classes=classes,
        paths=[str(paths[i]) for i in ok],
        skipped=skipped,
    )


def decode_files(
    paths, size: int, workers: int = 0, batch_size: int = 256, max_pixels: int | None = None, keep: bool = True
):
    """Decode image files in worker processes: (uint8 tensor of the good ones, or None unless
    keep, their positions, skipped)."""
    chunks, ok, skipped = [], [], []
    for good, images, _, bad in iter_decoded(paths, size, workers, batch_size, max_pixels):
        ok += good
        if images is not None and keep:
            chunks.append(images)
        skipped += [(str(paths[i]), reason) for i, reason in bad]
    if not keep:
        return None, ok, skipped
    images = torch.cat(chunks) if chunks else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return images, ok, skipped


def auto_image_size(root: str | Path, device_type: str = "cpu", sample: int = 200) -> int:
    """The training size for a folder: PHOTO_IMAGE_SIZE (64 px) on a GPU when at least a quarter
    of an evenly spaced sample has a shorter side that long or longer (photos; only the headers
    are read), else IMAGE_SIZE (32 px).

    On the CPU photos train at 32 px too: a step at 64 px costs four times as much, and within a
    CPU budget the steps count more than the pixels (copy detection, 15 minutes on 2 cores,
    benchmarks/retrieval_quality.py: 0.929 mAP at 32 px, 406 epochs; 0.822 at 64 px, 110)."""
    if device_type != "cuda":
        return IMAGE_SIZE
    from PIL import Image

    root = Path(root)
    train_dir = root / "train"
    paths = list_image_files(train_dir if train_dir.is_dir() else root)
    step = max(1, len(paths) // sample)
    sides = []
    for path in paths[::step][:sample]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # a bad file is reported when the data is read
    photos = sides and np.mean(np.array(sides) >= PHOTO_IMAGE_SIZE) >= 0.25
    return PHOTO_IMAGE_SIZE if photos else IMAGE_SIZE


def too_large_to_hold(n: int, size: int, share: float = 0.25) -> bool:
    """Whether n decoded size x size images would take over `share` of the machine's memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return n * 3 * size * size > share * memory


def report_skipped(skipped: list[tuple[str, str]], shown: int = 10) -> None:
    if not skipped:
        return
    log(f"skipped {len(skipped)} unreadable file(s):")
    for path, reason in skipped[:shown]:
        log(f"  {path!r}: {reason}")
    if len(skipped) > shown:
        log(f"  ... and {len(skipped) - shown} more")
