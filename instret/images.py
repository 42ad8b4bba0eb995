"""Reading image files: listing a folder, and decoding one file into a square uint8 tensor."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

# Pillow's own limit (about 89 M pixels) only warns below twice that; instret refuses at it.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


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


def open_rgb(path: str | Path, max_pixels: int | None = MAX_IMAGE_PIXELS, draft: int | None = None) -> Image.Image:
    """An upright RGB image; raises ImageReadError with a short reason for anything unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageReadError(
                    f"{img.width}x{img.height} pixels is over the limit of {max_pixels} (decompression bomb?)"
                )
            if draft is not None and img.format == "JPEG":
                # JPEG can decode at 1/2, 1/4 or 1/8 scale: much faster when shrinking anyway.
                img.draft("RGB", (draft, draft))
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = _flatten_alpha(img)
            return img.convert("RGB")
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageReadError(reason) from None


def _flatten_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba)


def square_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to `size`, centre-crop to size x size: uint8 tensor 3 x size x size."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def read_image(path: str | Path, size: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """One image file as a uint8 tensor 3 x size x size; raises ImageReadError."""
    return square_tensor(open_rgb(path, max_pixels=max_pixels, draft=size), size)


def read_image_and_hash(path: str | Path, size: int, max_pixels: int | None = MAX_IMAGE_PIXELS):
    """(uint8 tensor, sha256 hex of the file's bytes): the file is read once for both."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageReadError(e.strerror or type(e).__name__) from None
    digest = hashlib.sha256(data).hexdigest()
    return square_tensor(open_rgb(io.BytesIO(data), max_pixels=max_pixels, draft=size), size), digest


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img, digest = read_image_and_hash(self.paths[i], self.size)
            return i, img, digest, None
        except ImageReadError as e:
            return i, None, None, str(e)


def _collate(batch):
    # Stacked in the worker: one shared tensor per batch, not one file descriptor per image.
    good = [(i, img, digest) for i, img, digest, _ in batch if img is not None]
    images = torch.stack([img for _, img, _ in good]) if good else None
    bad = [(i, reason) for i, img, _, reason in batch if img is None]
    return [i for i, _, _ in good], images, [d for _, _, d in good], bad


def iter_decoded(paths, size: int, workers: int = 0, batch_size: int = 256):
    """Decode files in worker processes, in order, a batch at a time.

    Yields (positions of the readable files, uint8 tensor B x 3 x size x size or None,
    their sha256 digests, [(position, reason)] for the unreadable ones).
    """
    loader = torch.utils.data.DataLoader(
        _DecodeDataset(list(paths), size), batch_size=batch_size, num_workers=workers, collate_fn=_collate
    )
    yield from loader
