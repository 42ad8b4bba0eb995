"""Reading image files: listing a folder, and decoding one file into a square uint8 tensor."""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from pillow_heif import register_heif_opener

from instret.borders import trim_borders
from instret.defaults import MAX_IMAGE_PIXELS
from instret.errors import InstretError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".heic", ".heif", ".avif"}
)

# Phones save HEIC: pillow-heif's opener lets Image.open read it (AVIF Pillow reads itself). It
# opens lazily, as Pillow's own formats do: the pixel limits below are checked from the header.
register_heif_opener()

# Pillow's own limit (about 89 M pixels) only warns below twice that; instret refuses at it.
# Every reader takes max_pixels (--max-image-pixels): None means this default, 0 no limit.


class ImageReadError(Exception):
    """This file could not be read as an image; the message says why, in a few words."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(root: str | Path) -> list[Path]:
    """Every image file under root, recursively, sorted; symlinked folders are not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in filenames if is_image_file(name))
    return sorted(found)


def open_rgb(path: str | Path | io.BytesIO, max_pixels: int | None = None, draft: int | None = None) -> Image.Image:
    """An upright RGB image; raises ImageReadError with a short reason for anything unreadable.

    max_pixels: refuse images with more pixels than this (None: MAX_IMAGE_PIXELS; 0: no limit).
    """
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels or None
    if max_pixels is None or max_pixels > MAX_IMAGE_PIXELS:
        # A limit above Pillow's default, asked for explicitly: Pillow's own check must not refuse first.
        Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageReadError(_too_many_pixels(img.width * img.height, max_pixels))
            if draft is not None and img.format in ("JPEG", "MPO"):
                # JPEG can decode at 1/2, 1/4 or 1/8 scale: much faster when shrinking anyway.
                # (MPO: a camera's JPEG with extra pictures, such as a depth map, after the first.)
                img.draft("RGB", (draft, draft))
            # In place, and no conversion of a single RGB picture: each would copy every pixel.
            # (A file of several pictures stays open while its image lives: that one is copied.)
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                img = _sixteen_to_eight_bit(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = _flatten_alpha(img)
            return img if img.mode == "RGB" and getattr(img, "n_frames", 1) == 1 else img.convert("RGB")
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refused first (at twice its default); say it the same way as above.
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageReadError(_too_many_pixels(int(found.group(1)) if found else None, max_pixels)) from None
    except Image.UnidentifiedImageError:
        if _is_empty(path):
            raise ImageReadError("empty file") from None
        kind = _heif_kind(path)
        raise ImageReadError(
            f"a damaged or truncated {kind} file" if kind else "not an image in any format Pillow reads"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        kind = _heif_kind(path)
        raise ImageReadError(f"a damaged or truncated {kind} file ({reason})" if kind else reason) from None


def thumbnail(path: str | Path, size: int) -> Image.Image | None:
    """An upright RGB picture of the file within size x size, or None if it cannot be read
    (a picture for a person to look at: a missing one must not stop the page or grid)."""
    try:
        img = open_rgb(path, draft=size)
    except (ImageReadError, OSError):
        return None
    img.thumbnail((size, size))
    return img


def _too_many_pixels(pixels: int | None, limit: int | None) -> str:
    count = f"{pixels} pixels" if pixels is not None else "too many pixels"
    return f"{count}, over the limit of {limit} (decompression bomb?; see --max-image-pixels)"


def _is_empty(path) -> bool:
    if isinstance(path, io.BytesIO):
        return len(path.getbuffer()) == 0
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


# The brands of an ISO media file's first box (ftyp) that say which picture format it holds.
HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}


def _heif_kind(path) -> str | None:
    """The format ("HEIC", "HEIF" or "AVIF") a file starts as, so that the reason for a failed read
    can name it; None for any other file."""
    try:
        if isinstance(path, io.BytesIO):
            with path.getbuffer() as view:
                head = bytes(view[:12])
        else:
            with open(path, "rb") as f:
                head = f.read(12)
    except OSError:
        return None
    return HEIF_BRANDS.get(head[8:12]) if head[4:8] == b"ftyp" else None


def _sixteen_to_eight_bit(img: Image.Image) -> Image.Image:
    # Pillow's own conversion clips 16-bit values at 255 (a white image); scale them instead.
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba)


def square_tensor(img: Image.Image, size: int, trim: bool = True) -> torch.Tensor:
    """What the encoder sees of an image: its flat borders trimmed (instret.borders) when it is
    larger than size x size, the shorter side resized to `size`, then centre-cropped to
    size x size: uint8 tensor 3 x size x size."""
    if trim and min(img.size) > size:
        # Only an image with more pixels than the encoder takes: one at (or below) its size, a
        # CIFAR-10 thumbnail say, is taken as it is framed.
        img = trim_borders(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    # Channels first in numpy: one torch call rather than three, each costing more than the copy.
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def encoder_inputs(items, size: int, max_pixels: int | None = None) -> tuple[list[str], torch.Tensor]:
    """What the library's embedding takes, as the encoder's uint8 input (N x 3 x size x size)
    and a name for each: image files (str or Path), PIL images, image tensors (3 x H x W, uint8
    or float in [0, 1]) or a batch of them (N x 3 x H x W), alone or in a list. Each is read as
    `instret index` reads a file; a folder stands for its image files. Raises InstretError
    naming the item it cannot use."""
    if isinstance(items, (str, Path, Image.Image)) or (isinstance(items, torch.Tensor) and items.dim() == 3):
        items = [items]
    elif isinstance(items, torch.Tensor) and items.dim() == 4:
        items = list(items)
    items = [found for item in items for found in _folder_or_item(item)]
    names, images = [], []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            try:
                images.append(read_image(item, size, max_pixels))
            except ImageReadError as e:
                raise InstretError(f"{item}: cannot read image: {e}") from None
            names.append(str(item))
            continue
        if isinstance(item, torch.Tensor):
            item = _tensor_picture(item, i)
        elif not isinstance(item, Image.Image):
            raise InstretError(
                f"item {i}: expected an image file, a PIL image or an image tensor, not {type(item).__name__}"
            )
        images.append(square_tensor(item.convert("RGB"), size))
        names.append(f"<image {i}>")
    if not images:
        return [], torch.empty(0, 3, size, size, dtype=torch.uint8)
    return names, torch.stack(images)


def _folder_or_item(item) -> list:
    """A folder stands for the image files in it (and below), in sorted order."""
    if isinstance(item, (str, Path)) and Path(item).is_dir():
        found = list_image_files(item)
        if not found:
            raise InstretError(f"{item}: a folder with no image files in it")
        return found
    return [item]


def _tensor_picture(t: torch.Tensor, i: int) -> Image.Image:
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise InstretError(f"item {i}: an image tensor is 3 x H x W (or 1 x H x W), not {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        t = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(t.expand(3, -1, -1).permute(1, 2, 0).cpu().numpy())


def read_file_bytes(path: str | Path) -> bytes:
    """A regular file's bytes; raises ImageReadError for anything else (a FIFO would block, a
    device never end) and for a file that vanished or became unreadable since it was listed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ImageReadError(e.strerror or type(e).__name__) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageReadError("not a regular file")
        try:
            return f.read()
        except OSError as e:
            raise ImageReadError(e.strerror or type(e).__name__) from None


def read_image(path: str | Path, size: int, max_pixels: int | None = None) -> torch.Tensor:
    """One image file as a uint8 tensor 3 x size x size; raises ImageReadError."""
    return decode_image(read_file_bytes(path), size, max_pixels)


def read_image_and_hash(path: str | Path, size: int, max_pixels: int | None = None):
    """(uint8 tensor, sha256 hex of the file's bytes): the file is read once for both."""
    data = read_file_bytes(path)
    return decode_image(data, size, max_pixels), hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, size: int, max_pixels: int | None = None) -> torch.Tensor:
    """An image file's bytes as the encoder's uint8 input 3 x size x size; raises ImageReadError."""
    return square_tensor(open_rgb(io.BytesIO(data), max_pixels=max_pixels, draft=size), size)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DecodeDataset(torch.utils.data.Dataset):
    """Item i: (i, uint8 3 x size x size or None, sha256 or None, why it failed or None)."""

    def __init__(self, paths, size, max_pixels, hashes):
        self.paths, self.size, self.max_pixels, self.hashes = paths, size, max_pixels, hashes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            if self.hashes:
                img, digest = read_image_and_hash(self.paths[i], self.size, self.max_pixels)
            else:
                img, digest = read_image(self.paths[i], self.size, self.max_pixels), None
            return i, img, digest, None
        except ImageReadError as e:
            return i, None, None, str(e)


def _collate(batch):
    # Stacked in the worker: one shared tensor per batch, not one file descriptor per image.
    good = [(i, img, digest) for i, img, digest, _ in batch if img is not None]
    images = torch.stack([img for _, img, _ in good]) if good else None
    bad = [(i, reason) for i, img, _, reason in batch if img is None]
    return [i for i, _, _ in good], images, [d for _, _, d in good], bad


def iter_decoded(
    paths, size: int, workers: int = 0, batch_size: int = 256, max_pixels: int | None = None, hashes: bool = False
):
    """Decode files in worker processes, in order, a batch at a time.

    Yields (positions of the readable files, uint8 tensor B x 3 x size x size or None,
    their sha256 digests (None each unless hashes), [(position, reason)] for the unreadable ones).
    """
    dataset = DecodeDataset(list(paths), size, max_pixels, hashes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    yield from loader
