"""Bad and awkward image files, generated here: each writer makes one file and returns its path.

BAD: files no reader can use, with a word the refusal's reason must contain.
ODD: valid files in awkward forms, with what reading them must give.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_bytes(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **params)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels and holds none: what a decompression bomb's
    header looks like to a reader that checks before it decodes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def zero_bytes(d: Path) -> Path:
    (p := d / "zero.jpg").write_bytes(b"")
    return p


def truncated_jpeg(d: Path) -> Path:
    data = _jpeg_bytes()
    (p := d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return p


def truncated_png(d: Path) -> Path:
    noise = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(noise))
    (p := d / "truncated.png").write_bytes(data[: len(data) // 2])
    return p


def html_as_jpeg(d: Path) -> Path:
    (p := d / "page.jpg").write_text("<!doctype html><html><body>not a picture</body></html>\n")
    return p


def header_bomb(d: Path) -> Path:
    (p := d / "bomb.png").write_bytes(png_header_only(30_000, 30_000))
    return p


def symlink_loop(d: Path) -> Path:
    p = d / "loop.jpg"
    os.symlink(p.name, p)  # points at itself
    return p


def fifo(d: Path) -> Path:
    p = d / "pipe.jpg"
    os.mkfifo(p)  # reading it would wait for a writer forever
    return p


BAD = {
    "zero_bytes": (zero_bytes, "empty file"),
    "truncated_jpeg": (truncated_jpeg, "truncated"),
    "truncated_png": (truncated_png, "truncated"),
    "html_as_jpeg": (html_as_jpeg, "not an image"),
    "header_bomb": (header_bomb, "over the limit"),
    "symlink_loop": (symlink_loop, "symbolic links"),
    "fifo": (fifo, "not a regular file"),
}


# --- valid, awkward ---------------------------------------------------------------------


def png_named_jpg(d: Path) -> Path:
    (p := d / "really_a_png.jpg").write_bytes(_png_bytes(Image.new("RGB", (20, 20), (10, 200, 30))))
    return p


def one_pixel(d: Path) -> Path:
    (p := d / "one_pixel.png").write_bytes(_png_bytes(Image.new("RGB", (1, 1), (250, 10, 10))))
    return p


def cmyk_jpeg(d: Path) -> Path:
    p = d / "cmyk.jpg"
    Image.new("CMYK", (24, 24), (0, 255, 0, 0)).save(p, quality=95)  # magenta ink only
    return p


def sixteen_bit_png(d: Path) -> Path:
    p = d / "sixteen_bit.png"
    Image.fromarray(np.full((24, 24), 32896, dtype=np.uint16)).save(p)  # 32896 / 257 = 128
    return p


def palette_png_with_transparency(d: Path) -> Path:
    img = Image.new("P", (24, 24), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, 24, 12))  # top half blue, bottom half colour 0, which is transparent
    p = d / "palette_transparent.png"
    img.save(p, transparency=0)
    return p


def grey_with_alpha(d: Path) -> Path:
    p = d / "grey_alpha.png"
    Image.new("LA", (24, 24), (50, 255)).save(p)
    return p


def animated_gif(d: Path) -> Path:
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = d / "animated.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return p


def exif_rotated(d: Path) -> Path:
    """Stored 40 wide x 20 high, left half red; EXIF orientation 6 says 'rotate 90 degrees clockwise
    to view', so the upright picture is 20 wide x 40 high with red in its top half."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = d / "rotated.jpg"
    img.save(p, exif=exif.tobytes(), quality=95)
    return p


def _close(rgb, expected, tol=12) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(rgb, expected))


# Each check takes the upright RGB image instret reads.
ODD = {
    "png_named_jpg": (png_named_jpg, lambda im: _close(im.getpixel((5, 5)), (10, 200, 30))),
    "one_pixel": (one_pixel, lambda im: im.size == (1, 1)),
    "cmyk_jpeg": (cmyk_jpeg, lambda im: _close(im.getpixel((5, 5)), (255, 0, 255))),
    "sixteen_bit_png": (sixteen_bit_png, lambda im: _close(im.getpixel((5, 5)), (128, 128, 128), 1)),
    "palette_png_with_transparency": (
        palette_png_with_transparency,
        lambda im: _close(im.getpixel((5, 2)), (0, 0, 255)) and _close(im.getpixel((5, 20)), (255, 255, 255)),
    ),
    "grey_with_alpha": (grey_with_alpha, lambda im: _close(im.getpixel((5, 5)), (50, 50, 50))),
    "animated_gif": (animated_gif, lambda im: _close(im.getpixel((5, 5)), (255, 0, 0), 30)),
    "exif_rotated": (
        exif_rotated,
        lambda im: (
            im.size == (20, 40)
            and _close(im.getpixel((10, 5)), (255, 0, 0), 30)
            and _close(im.getpixel((10, 35)), (0, 0, 255), 30)
        ),
    ),
}

# Names that are valid but awkward on a command line, in a terminal or in SQLite.
ODD_NAMES = [b"with space.png", "caf\u00e9 \u65e5\u672c.png".encode(), b"new\nline.png", b"bad\xff\xfebytes.png"]
