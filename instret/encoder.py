"""Encoders: a backbone, a linear head to `low_dim`, and L2 normalisation; export and load.

`encoder.pt` is the slim export that `index` and `query` load: the weights plus everything
needed to rebuild the model and preprocess an image (arch, low_dim, image_size, mean, std),
as plain data, so `torch.load(..., weights_only=True)` reads it.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from instret.colour import DIM as COLOUR_DIM
from instret.colour import with_colour
from instret.errors import InstretError
from instret.locations import encoder_file
from instret.storage import atomic_torch_save, load_torch_file

ENCODER_FORMAT_VERSION = 1


def small_backbone(width: int = 32) -> tuple[nn.Module, int]:
    """A plain VGG-style CNN that trains quickly on a CPU (0.26 M parameters at width 32)."""

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w = width
    layers = [
        *block(3, w // 2),
        *block(w // 2, w),
        nn.MaxPool2d(2),
        *block(w, 2 * w),
        nn.MaxPool2d(2),
        *block(2 * w, 4 * w),
        nn.MaxPool2d(2),
        # The last block ends in BatchNorm, not ReLU: zero-centred pooled features. After a
        # ReLU their large common mean makes every image's feature nearly the same direction
        # (cosine ~0.999 at init), and instance discrimination then starts from a collapse it
        # takes hundreds of steps to leave.
        *block(4 * w, 4 * w)[:2],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    return nn.Sequential(*layers), 4 * w


def resnet_backbone(arch: str, small_images: bool) -> tuple[nn.Module, int]:
    try:
        import torchvision
    except ModuleNotFoundError:  # a CPU-only torch install may leave it out; the small CNN needs none
        raise InstretError(
            f"--arch {arch} needs torchvision (pip install torchvision); --arch small does not"
        ) from None

    net = getattr(torchvision.models, arch)(weights=None)
    if small_images:
        # The CIFAR stem of the authors: 3x3 stride-1 first conv, no max-pool.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class Encoder(nn.Module):
    """image -> backbone -> linear -> L2-normalised low_dim feature."""

    def __init__(self, arch: str = "small", low_dim: int = 128, image_size: int = 32):
        super().__init__()
        if arch == "small":
            self.backbone, dim = small_backbone()
        elif arch in ("resnet18", "resnet50"):
            self.backbone, dim = resnet_backbone(arch, small_images=image_size <= 64)
        else:
            raise InstretError(f"unknown architecture {arch!r}")
        self.head = nn.Linear(dim, low_dim)
        self.arch, self.low_dim, self.image_size = arch, low_dim, image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def resolve_arch(arch: str, device: torch.device) -> str:
    if arch == "auto":
        return "resnet18" if device.type == "cuda" else "small"
    return arch


def fingerprint(state_dict: dict) -> str:
    """A short content hash of the weights: the index refuses queries from another encoder."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_encoder(model: Encoder, path: str | Path, mean, std, colour_weight: float = 0.0) -> str:
    """encoder.pt; colour_weight > 0: its vectors carry a colour signature (instret.colour)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fp = with_colour_mark(fingerprint(state), colour_weight)
    atomic_torch_save(
        {
            "format_version": ENCODER_FORMAT_VERSION,
            "arch": model.arch,
            "low_dim": model.low_dim,
            "image_size": model.image_size,
            "mean": list(mean),
            "std": list(std),
            "fingerprint": fp,
            "colour_weight": float(colour_weight),
            "state_dict": state,
        },
        path,
    )
    return fp


def with_colour_mark(fp: str, colour_weight: float) -> str:
    """The weights' fingerprint, marked when a colour signature joins the features: the same
    weights then give other vectors, so an index of one is not updated with the other."""
    return f"{fp}+colour{colour_weight:g}" if colour_weight else fp


class LoadedEncoder:
    """An exported encoder ready for inference: model in eval mode plus its preprocessing."""

    def __init__(self, model: Encoder, mean, std, fingerprint: str, colour_weight: float = 0.0):
        self.model, self.mean, self.std, self.fingerprint = model, tuple(mean), tuple(std), fingerprint
        self.colour_weight = colour_weight

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def dim(self) -> int:
        return self.model.low_dim + (COLOUR_DIM if self.colour_weight else 0)

    def embed(self, items, max_pixels: int | None = None) -> np.ndarray:
        """Feature rows (float32, L2-normalised; before an index's whitening) of image files, PIL
        images or image tensors (instret.images.encoder_inputs says which), in order."""
        return self.embed_named(items, max_pixels)[1]

    def embed_named(self, items, max_pixels: int | None = None) -> tuple[list[str], np.ndarray]:
        """(a name for each item: a file's path or "<image i>", its feature rows)."""
        from instret.images import encoder_inputs

        names, images = encoder_inputs(items, self.image_size, max_pixels)
        return names, self.embed_inputs(images)

    def embed_inputs(self, images: torch.Tensor) -> np.ndarray:
        """Feature rows of images already in the encoder's input form (uint8 N x 3 x size x size)."""
        images = images.to(next(self.model.parameters()).device)
        features = embed_images(self.model, images, self.mean, self.std).float()
        if self.colour_weight:
            features = with_colour(features, images, self.colour_weight)
        return features.cpu().numpy()


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> LoadedEncoder:
    """Load `encoder.pt`, a run folder's, or the one an index was built with (instret.locations)."""
    path = encoder_file(path)
    blob = load_torch_file(path, "encoder", ("state_dict", "arch", "low_dim", "image_size"), ENCODER_FORMAT_VERSION)
    try:
        model = Encoder(blob["arch"], blob["low_dim"], blob["image_size"])
        model.load_state_dict(blob["state_dict"])
        mean, std = blob["mean"], blob["std"]
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError):
        raise InstretError(f"{path}: weights do not fit a {blob['arch']!r} encoder; the file is damaged") from None
    model.to(device).eval()
    colour = float(blob.get("colour_weight", 0.0))
    fp = blob.get("fingerprint") or with_colour_mark(fingerprint(blob["state_dict"]), colour)
    return LoadedEncoder(model, mean, std, fp, colour)


@torch.no_grad()
def embed_images(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 512) -> torch.Tensor:
    """Features of resident uint8 images under the test transform, on the images' device."""
    if len(images) == 0:
        return torch.empty(0, model.low_dim, device=images.device)
    return embed_batches(model, images.split(batch_size), mean, std)


@torch.no_grad()
def embed_batches(model: nn.Module, batches, mean, std) -> torch.Tensor:
    """Features of batches of uint8 images under the test transform, concatenated in order."""
    from instret.augment import eval_transform

    was_training = model.training
    model.eval()
    out = [model(eval_transform(b, mean, std).contiguous(memory_format=torch.channels_last)) for b in batches]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.low_dim, device=next(model.parameters()).device)


@torch.no_grad()
def calibrated_copy(model: nn.Module, batches, mean, std):
    """A copy of the model whose BatchNorm statistics are re-estimated on clean images
    (batches of uint8 images; the trainer passes an evenly spaced sample of its set).

    Training keeps BatchNorm running statistics of heavily augmented batches, which are off
    for clean images at test time. The gain is small but consistent (CIFAR-10, 8 epochs of
    `small`: kNN top-1 0.4727 -> 0.4745, top-5 0.918 -> 0.923). The copy is used for
    evaluation and export only, so training itself stays as the paper has it.
    """
    import copy

    from instret.augment import eval_transform

    clone = copy.deepcopy(model)
    norms = [m for m in clone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    batches = iter(batches)
    first = next(batches, None)
    if not norms or first is None:  # nothing to calibrate: the training statistics stay
        return clone.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    clone.train()
    for images in itertools.chain([first], batches):
        clone(eval_transform(images, mean, std))
    return clone.eval()
