"""Flat borders: the frame, padding or letterbox bars a copy of a photo often gains.

A border is a run of lines at an edge of the image that are (nearly) all one colour: the colour
of the outermost line. Trimming it before the encoder sees the image makes a framed or
letterboxed copy look like its original again (on the retrieval benchmark, recall@1 of
bordered copies rose from 0.71; benchmarks/README.md: "Search quality"). Trimming is cautious: JPEG noise
and a slight blur stay within the tolerance, a flat image is left alone, and no more than
MAX_SIDE of a side is taken on each edge.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TOLERANCE = 16  # largest channel difference (of 255) from the border colour that is still "flat"
FLAT_SHARE = 0.98  # share of a line's pixels within the tolerance for the line to be border
MAX_SIDE = 0.3  # at most this share of the width (height) is trimmed at each edge
MIN_LINES = 2  # thinner runs are left: an edge line of a photo is not a frame
WORK_SIDE = 512  # larger images are measured on a box-reduced copy


def border_box(img: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image without its flat borders: the whole image
    when it has none."""
    w, h = img.size
    factor = max(1, max(w, h) // WORK_SIDE)
    small = img.reduce(factor) if factor > 1 else img
    sw, sh = small.size
    if sh < 2 * MIN_LINES or sw < 2 * MIN_LINES or not _an_edge_may_be_flat(small):
        return (0, 0, w, h)
    a = np.asarray(small)
    (left, right), (top, bottom) = _depths_from_both_ends(a.transpose(1, 0, 2)), _depths_from_both_ends(a)
    if (left, top) == (right, bottom) == (int(sw * MAX_SIDE), int(sh * MAX_SIDE)) and _spread(a) <= TOLERANCE:
        return (0, 0, w, h)  # all one colour: nothing is a border

    # Back to full-size pixels, each trim rounded up: no line of border is left.
    def up(lines, full, reduced):
        return -(-lines * full // reduced)

    return (up(left, w, sw), up(top, h, sh), w - up(right, w, sw), h - up(bottom, h, sh))


def _an_edge_may_be_flat(img: Image.Image) -> bool:
    """Whether the outermost lines of some edge span at most twice the tolerance in every
    channel. Most images have no such edge; Pillow sees it without copying their pixels."""
    w, h = img.size
    for box in ((0, 0, MIN_LINES, h), (0, 0, w, MIN_LINES), (w - MIN_LINES, 0, w, h), (0, h - MIN_LINES, w, h)):
        if max(high - low for low, high in img.crop(box).getextrema()) <= 2 * TOLERANCE:
            return True
    return False


def _depths_from_both_ends(lines: np.ndarray) -> tuple[int, int]:
    """How many lines from the start and from the end of `lines` (L x M x 3) are flat in the
    colour of the outermost line on that end (0 for fewer than MIN_LINES), both ends at once."""
    most = int(len(lines) * MAX_SIDE)
    length = lines.shape[1]
    if most < MIN_LINES or length < 4:
        return (0, 0)
    ends = np.stack((lines[:most], lines[::-1][:most])).astype(np.int16)  # 2 x most x M x 3
    colour = np.rint(ends[:, 0].sum(axis=1) / length).astype(np.int16)  # the outermost lines' mean
    near = (np.abs(ends - colour[:, None, None, :]) <= TOLERANCE).all(axis=3)
    flat = near.sum(axis=2) / length >= FLAT_SHARE  # 2 x most
    runs = np.where(flat.all(axis=1), most, flat.argmin(axis=1))
    return tuple(int(run) if run >= MIN_LINES else 0 for run in runs)


def _spread(pixels: np.ndarray) -> int:
    """The largest range of a channel over these pixels (... x 3 uint8)."""
    flat = pixels.reshape(-1, 3)
    return int((flat.max(axis=0) - flat.min(axis=0)).max())


def trim_borders(img: Image.Image) -> Image.Image:
    """The image without its flat borders (the image itself when it has none)."""
    box = border_box(img)
    return img if box == (0, 0, *img.size) else img.crop(box)
