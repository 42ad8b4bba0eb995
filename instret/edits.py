"""Edited copies of a photo: what people do to an image before it comes back as a "copy".

Crops, resizes, JPEG re-encoding, colour and brightness shifts, greyscale, flips, small
rotations, blur, borders, a text or logo overlay, and combinations of them. The index uses
them to learn what scores an edited copy of its own images gets (instret.calibration); the
retrieval benchmark uses them as queries.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps


def crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """A crop keeping 40-90 % of the area, of roughly the same shape, anywhere in the image."""
    w, h = img.size
    keep = rng.uniform(0.4, 0.9) ** 0.5
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((left, top, left + cw, top + ch))


def resize(img: Image.Image, rng: random.Random) -> Image.Image:
    f = rng.uniform(0.3, 0.8)
    return img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.BILINEAR)


def jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(20, 70))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def colour(img: Image.Image, rng: random.Random) -> Image.Image:
    """Saturation and a per-channel gain: a white-balance or filter-app look."""
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.6))
    gains = [rng.uniform(0.8, 1.2) for _ in range(3)]
    channels = [c.point(lambda v, g=g: min(255, round(v * g))) for c, g in zip(img.split(), gains)]
    return Image.merge("RGB", channels)


def brightness(img: Image.Image, rng: random.Random) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rng.choice([rng.uniform(0.55, 0.8), rng.uniform(1.2, 1.5)]))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))


def greyscale(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


def flip(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(img)


def rotate(img: Image.Image, rng: random.Random) -> Image.Image:
    """A small rotation (3-12 degrees either way), cropped back to the content (no black corners)."""
    angle = rng.uniform(3, 12) * rng.choice([-1, 1])
    turned = img.rotate(angle, Image.BILINEAR, expand=False)
    m = round(min(img.size) * 0.12)
    return turned.crop((m, m, img.width - m, img.height - m))


def blur(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5) * max(img.size) / 224))


def border(img: Image.Image, rng: random.Random) -> Image.Image:
    """Padding or a frame: 5-20 % of the side, in a flat colour, on some or all sides."""
    pad = [round(rng.uniform(0.05, 0.2) * s) for s in (img.width, img.height)]
    fill = rng.choice([(0, 0, 0), (255, 255, 255), tuple(rng.randint(0, 255) for _ in range(3))])
    if rng.random() < 0.5:  # letterbox: top and bottom only
        return ImageOps.expand(img, border=(0, pad[1], 0, pad[1]), fill=fill)
    return ImageOps.expand(img, border=(pad[0], pad[1], pad[0], pad[1]), fill=fill)


def overlay(img: Image.Image, rng: random.Random) -> Image.Image:
    """A caption bar with text, or a logo-like badge, over part of the image."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    w, h = img.size
    if rng.random() < 0.5:
        bar = round(h * rng.uniform(0.1, 0.2))
        top = rng.choice([0, h - bar])
        draw.rectangle((0, top, w, top + bar), fill=(0, 0, 0))
        text = rng.choice(["SALE 50% OFF", "@someone", "Holiday 2024", "lol", "Copyright (c)"])
        draw.text((w * 0.05, top + bar * 0.25), text, fill=(255, 255, 255))
    else:
        r = round(min(w, h) * rng.uniform(0.12, 0.25))
        x, y = rng.choice([r, w - r]), rng.choice([r, h - r])
        draw.ellipse(
            (x - r, y - r, x + r, y + r),
            fill=tuple(rng.randint(0, 255) for _ in range(3)),
            outline=(255, 255, 255),
            width=max(1, r // 8),
        )
        draw.text((x - r * 0.5, y - r * 0.2), "LOGO", fill=(255, 255, 255))
    return img


SINGLE_EDITS = {
    f.__name__: f for f in (crop, resize, jpeg, colour, brightness, greyscale, flip, rotate, blur, border, overlay)
}
# Combinations as they happen: a screenshot crop re-saved, a filtered and captioned repost, ...
COMBINATIONS = {
    "crop+jpeg": (crop, jpeg),
    "resize+jpeg": (resize, jpeg),
    "flip+colour+crop": (flip, colour, crop),
    "overlay+brightness+jpeg": (overlay, brightness, jpeg),
    "border+resize+blur": (border, resize, blur),
    "greyscale+crop+jpeg": (greyscale, crop, jpeg),
    "rotate+colour": (rotate, colour),
}
EDITS = {**{name: (f,) for name, f in SINGLE_EDITS.items()}, **COMBINATIONS}


def edited_copy(img: Image.Image, name: str, rng: random.Random) -> Image.Image:
    """The image with the edit (or chain of edits) `name` of EDITS applied, as RGB."""
    img = img.convert("RGB")
    for step in EDITS[name]:
        img = step(img, rng)
    return img.convert("RGB")
