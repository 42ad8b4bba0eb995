"""Reading image files: listing a folder, and decoding one file into a square uint8 tensor."""

from __future__ import annotations

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
