"""The paper's augmentation as batched tensor operations with per-sample random parameters.

RandomResizedCrop(scale 0.2-1) + horizontal flip (one affine grid_sample), ColorJitter(0.4 x 4)
in a random order per sample, RandomGrayscale(0.2), then normalisation. Beyond the paper, for
the edits that copies of a photo go through (benchmarks/README.md: "Search quality"): a small rotation (in
the same grid_sample), a box painted over part of the image (a caption, logo or sticker:
random erasing with a flat colour) and a slight blur; each is drawn only when it is on, so the
paper's recipe draws exactly the paper's random numbers. It runs on whatever
device the batch is on and draws every random number from one torch.Generator, so a run is
reproducible and resumable. Parameters are drawn by `sample_params` and applied by `apply`,
which lets tests compare each stage with torchvision's per-sample transforms.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its centre-crop fallback
HSV_TABLE = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))  # sextant -> (r, g, b) from (v, p, q, t)


@functools.lru_cache(maxsize=64)
def constant(values: tuple, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small tensor of fixed values on a device, made once: torch.tensor(...) on a GPU is a
    copy from the host that waits for it, and an augmentation step would otherwise make eight."""
    return torch.tensor(values, device=device, dtype=dtype)


@dataclass
class AugmentParams:
    box: torch.Tensor  # n x 4: top, left, height, width of the crop, in pixels
    flip: torch.Tensor  # n, bool
    factors: torch.Tensor  # n x 4: brightness, contrast, saturation, hue
    order: torch.Tensor  # n x 4: which jitter op runs at each of the 4 stages
    gray: torch.Tensor  # n, bool
    angle: torch.Tensor | None = None  # n, radians; None: no rotation
    erase: torch.Tensor | None = None  # n x 4: top, left, height, width as fractions of the side (0 area: none)
    erase_colour: torch.Tensor | None = None  # n x 3 in [0, 1]
    blur: torch.Tensor | None = None  # n, bool


@dataclass
class Augment:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.4
    hue: float | None = None  # None: min(jitter, 0.5), torchvision's ColorJitter(j, j, j, j)
    grayscale_p: float = 0.2
    flip: bool = True
    rotate: float = 0.0  # degrees: rotations drawn uniformly in [-rotate, rotate]
    erase_p: float = 0.0  # chance of a flat-colour box over 2-15 % of the image
    blur_p: float = 0.0  # chance of a 3 x 3 blur

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, rows: slice | None = None, batch: int | None = None
    ) -> torch.Tensor:
        """uint8 N x 3 x H x W -> augmented, normalised float N x 3 x size x size.

        rows, batch: the images are these rows of a batch of `batch`, and get the parameters
        the whole batch would give them (one process's share of a global batch: the same
        random draws everywhere).
        """
        n = len(images) if rows is None else batch
        params = self.sample_params(n, images.shape[-2], images.shape[-1], generator, images.device)
        if rows is not None:
            fields = (getattr(params, f.name) for f in dataclasses.fields(params))
            params = AugmentParams(*(None if v is None else v[rows] for v in fields))
        return normalize(self.apply(images, params), self.mean, self.std)

    def sample_params(self, n: int, height: int, width: int, generator, device) -> AugmentParams:
        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=device)

        box = crop_boxes(rand(n, ATTEMPTS), rand(n, ATTEMPTS), rand(n, 2), height, width, self.scale, self.ratio)
        j = self.jitter
        hue = min(j, 0.5) if self.hue is None else self.hue
        lo = constant((max(0.0, 1 - j),) * 3 + (-hue,), torch.device(device))
        hi = constant((1 + j,) * 3 + (hue,), torch.device(device))
        factors = lo + (hi - lo) * rand(n, 4)
        order = rand(n, 4).argsort(dim=1)
        flip = rand(n) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool, device=device)
        gray = rand(n) < self.grayscale_p
        p = AugmentParams(box, flip, factors, order, gray)
        if self.rotate > 0:
            p.angle = (rand(n) * 2 - 1) * math.radians(self.rotate)
        if self.erase_p > 0:
            area = 0.02 + 0.13 * rand(n)
            aspect = torch.exp((rand(n) * 2 - 1) * math.log(3.0))
            h, w = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
            on = (rand(n) < self.erase_p).float()
            p.erase = torch.stack([rand(n) * (1 - h), rand(n) * (1 - w), h * on, w * on], dim=1)
            p.erase_colour = rand(n, 3)
        if self.blur_p > 0:
            p.blur = rand(n) < self.blur_p
        return p

    def apply(self, images: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """uint8 or [0, 1] float images and their parameters -> float images in [0, 1]."""
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        x = crop_resize_flip(x, p.box, p.flip, self.size, p.angle)
        if self.jitter > 0:
            x = color_jitter(x, p.factors, p.order)
        x = torch.where(p.gray[:, None, None, None], grayscale(x).expand_as(x), x)
        if p.blur is not None:
            soft = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            x = torch.where(p.blur[:, None, None, None], soft, x)
        if p.erase is not None:
            x = paint_boxes(x, p.erase, p.erase_colour)
        return x


def crop_boxes(u_area, u_ratio, u_pos, height: int, width: int, scale, ratio) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for a batch: n x 4 (top, left, h, w)."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.int().argmax(dim=1, keepdim=True)  # the first box that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # The fallback when no attempt fits: the largest centred box of an allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    any_valid = valid.any(dim=1)
    w = torch.where(any_valid, w, torch.full_like(w, fw))
    h = torch.where(any_valid, h, torch.full_like(h, fh))
    top = torch.where(any_valid, (u_pos[:, 0] * (height - h + 1)).floor(), (height - h).div(2).floor())
    left = torch.where(any_valid, (u_pos[:, 1] * (width - w + 1)).floor(), (width - w).div(2).floor())
    return torch.stack([top, left, h, w], dim=1)


def crop_resize_flip(
    x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int, angle: torch.Tensor | None = None
) -> torch.Tensor:
    """Bilinear crop of each box to size x size, mirrored where flip and turned by angle (radians,
    about the box's centre): one affine grid_sample."""
    n, _, height, width = x.shape
    top, left, h, w = box.unbind(1)
    # Output pixel u (centre (u + .5) / size) samples source x = left + (u + .5) * w / size - .5,
    # i.e. resize with align_corners=False; in grid_sample's [-1, 1] coordinates that is affine.
    sx = w / width
    sy = h / height
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    mirror = torch.where(flip, -1.0, 1.0).to(x.dtype)
    if angle is None:
        theta[:, 0, 0] = mirror * sx
        theta[:, 1, 1] = sy
    else:  # output coordinates mirrored, then rotated, then scaled into the box
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        theta[:, 0, 0], theta[:, 0, 1] = sx * cos * mirror, -sx * sin
        theta[:, 1, 0], theta[:, 1, 1] = sy * sin * mirror, sy * cos
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def paint_boxes(x: torch.Tensor, boxes: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Each image with its box (top, left, height, width as fractions of the side) painted in its
    colour (n x 3); a box of zero size paints nothing."""
    n, _, height, width = x.shape
    ys = (torch.arange(height, device=x.device, dtype=x.dtype) + 0.5) / height  # pixel centres
    xs = (torch.arange(width, device=x.device, dtype=x.dtype) + 0.5) / width
    top, left, h, w = (boxes[:, i].to(x.dtype).view(n, 1) for i in range(4))
    rows = (ys >= top) & (ys < top + h)  # n x H
    cols = (xs >= left) & (xs < left + w)  # n x W
    inside = (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)  # n x 1 x H x W
    return torch.where(inside, colours.to(x.dtype).view(n, 3, 1, 1), x)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, grayscale(x), f)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn) per sample, through HSV as torchvision does."""
    h, s, v = rgb_to_hsv(x).unbind(1)
    h = (h + shift.view(-1, 1, 1)).remainder(1.0)
    return hsv_to_rgb(torch.stack([h, s, v], dim=1))


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    flat = delta == 0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    d = torch.where(flat, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), (h / 6.0).remainder(1.0))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    i = h6.floor()
    f = h6 - i
    i = i.long().remainder(6)
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    # The sextant i picks (r, g, b) from (v, p, q, t): the standard table.
    vpqt = torch.stack([v, p, q, t], dim=1)
    table = constant(HSV_TABLE, x.device)
    select = table[:, i].permute(1, 0, 2, 3)  # n x 3 x H x W
    return vpqt.gather(1, select)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # positions in JITTER_OPS, factors and order


def color_jitter(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, masked: bool | None = None
) -> torch.Tensor:
    """ColorJitter with per-sample factors and per-sample op order (n x 4 each). masked: the
    whole batch at every step, each sample taking its own op or none (the GPU's way, with no
    host sync; default on a GPU), rather than each op on the rows that chose it."""
    masked = x.is_cuda if masked is None else masked
    if masked:
        return _jitter_whole_batch(x, factors, order)
    for stage in range(4):
        for op, fn in enumerate(JITTER_OPS):
            rows = (order[:, stage] == op).nonzero().squeeze(1)
            if len(rows):
                x = x.index_copy(0, rows, fn(x.index_select(0, rows), factors[rows, op]))
    return x


def _jitter_whole_batch(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """color_jitter without choosing rows. Every sample shifts its hue exactly once, so the hue
    (the costly op: a round trip through HSV) runs once on the whole batch; the up to three
    blends before it and after it run as one blend a stage, each sample with its own op, or
    with factor 1 (itself, exactly) where it has none at that stage."""
    hue_at = (order == HUE).int().argmax(dim=1)  # the stage of each sample's hue shift
    for stage in range(3):
        x = _blend_stage(x, factors, order[:, stage], stage < hue_at)
    x = adjust_hue(x, factors[:, HUE])
    for after in range(1, 4):
        stage = hue_at + after
        x = _blend_stage(x, factors, order.gather(1, stage.clamp(max=3)[:, None]).squeeze(1), stage <= 3)
    return x


def _blend_stage(x: torch.Tensor, factors: torch.Tensor, op: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation (op, per sample) where active: each blends the image
    with its own baseline (black, mean grey, the image's grey)."""
    gray = grayscale(x)
    baseline = torch.where((op == SATURATION).view(-1, 1, 1, 1), gray, gray.mean(dim=(1, 2, 3), keepdim=True))
    baseline = torch.where((op == BRIGHTNESS).view(-1, 1, 1, 1), 0.0, baseline)
    chosen = factors.gather(1, op.clamp(max=SATURATION)[:, None]).squeeze(1)
    return _blend(x, baseline, torch.where(active, chosen, 1.0))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = constant(tuple(mean), x.device, x.dtype).view(1, -1, 1, 1)
    s = constant(tuple(std), x.device, x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def eval_transform(images: torch.Tensor, mean, std) -> torch.Tensor:
    """The test-time view: the resident image as it is, scaled and normalised."""
    return normalize(images.float().div(255), mean, std)


def channel_stats(batches: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of batches of uint8 images, as plain floats; sums in
    float64, a batch at a time, so a sample of any size costs one batch of memory."""
    count, total, squares = 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for images in batches:
        x = images.to("cpu", torch.float64).div_(255)
        count += x.numel() // 3
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    mean = total / count
    std = ((squares - count * mean.square()) / max(1, count - 1)).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
