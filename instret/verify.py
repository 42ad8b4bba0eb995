"""Is one image an edited copy of another? A check that does not depend on how well the encoder
trained: the two are aligned and compared as small grey pictures.

Both images are read upright, their flat borders trimmed, turned grey and shrunk to SIDE pixels
on the long side. Each picture is then searched for inside the other: at every scale of SCALES
(a copy cropped to 40 % of the area has 63 % of the side), at every offset, mirrored or not,
whole or cut to its middle, turned or not (VIEWS; a turned copy has lost its corners), by
normalised correlation, which ignores brightness and contrast; on half-size pictures first,
the best few alignments then again at full size, together with the pictures as they are (a
caption bar or a badge can outweigh the rest of a soft photo and win the coarse search for
another window); around the best, the angles ANGLE_STEP either side when it is turned (a copy
turned 8.5 degrees lies between the views) and the scales SCALE_STEPS either side (at 96 px a
crop between two of SCALES' steps misaligns by 3 pixels at its edges). The aligned pair is scored by blocks: the
median correlation of its detail (each picture less its blur) over the blocks that have any,
so that a caption or a logo over part of it does not decide, and a shared sky or shading does
not make two photos alike. ACCEPT or more, with the pictures themselves correlating
ACCEPT_SHADING or more, makes a copy. Two photos of one scene a few pixels apart align too, and
are copies; two photos of the same kind of thing do not (tests/test_verify.py).

A pair the embedding alone would not group (below the calibrated threshold) is checked
strictly: searched across thousands of such pairs, some photos of one kind of thing (two green
garbage trucks, two parachutes on a sky that the border trim cut away) align at 64 px by
chance. Such a pair must also align on a template of STRICT_SIDE pixels or more, and again on
FINE_SIDE pictures at ACCEPT_FINE: on 3,925 Imagenette photos with no copies among them that
took the false pairs from 8 to 0, at the cost of about 5 % of the edited copies checked so.

Cost: about 50 ms a pair on one core, and 27 ms to read a photo (once: a cache per call);
verify_pairs spreads many pairs over the cores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 64  # long side of the grey pictures compared
SCALES = (1.0, 0.92, 0.84, 0.76, 0.68, 0.6)  # template side over the other picture's side
TURNED_KEEP = 0.72  # share of a turned template's side kept (its corners are not the image's)
MIDDLE_KEEP = 0.84  # share of the side an unturned middle keeps
# (degrees turned, share of the side kept) of each template tried.
VIEWS = ((0.0, 1.0), (0.0, MIDDLE_KEEP), *((angle, TURNED_KEEP) for angle in (-6.0, 6.0, -11.0, 11.0)))
ANGLE_STEP = 2.5  # degrees either side of the best turned view, tried at full size
SCALE_STEPS = (-0.04, -0.02, 0.02, 0.04)  # and scales either side of the best (SCALES' step is 0.08)
REFINE_FROM = 0.35  # when the best alignment scores this or more (unrelated photos mostly score less)
ACCEPT = 0.55  # detail correlation of the aligned pictures that makes a copy (with ACCEPT_SHADING)
ACCEPT_SHADING = 0.8  # and the pictures' own, shading included
MIN_TEMPLATE = 6  # pixels of the picture compared (half size or full): a smaller template matches anything
REFINED = 3  # best half-size alignments looked at again at full size
BLOCKS = 4  # an aligned pair is scored by BLOCKS x BLOCKS blocks
DETAIL_BLUR = 2.0  # pixels: what is finer than this blur is the detail blocks are scored on
FLAT_BLOCK = 2.0  # grey levels of spread below which a block has no detail
MIN_BLOCKS = 8  # blocks with detail needed for a verdict: fewer, and a few edges would decide
STRICT_SIDE = 24  # pixels: the smallest template side a strict check accepts an alignment on
FINE_SIDE = 96  # long side of the pictures a strict check aligns again
ACCEPT_FINE = 0.65  # their detail correlation a strict check needs (95 % of edited copies reach it)


@dataclass(frozen=True)
class Verdict:
    score: float  # the aligned pictures' detail correlation (by blocks), -1 when unreadable
    scale: float  # the side of the matched part, over the whole
    mirrored: bool
    angle: float
    shading: float = -1.0  # the same for the pictures themselves, shading included
    side: int = 0  # pixels of the matched template's shorter side
    fine: float | None = None  # a strict check's score on FINE_SIDE pictures (None: not strict)

    @property
    def copy(self) -> bool:
        return (
            self.score >= ACCEPT and self.shading >= ACCEPT_SHADING and (self.fine is None or self.fine >= ACCEPT_FINE)
        )

    def reason(self) -> str:
        if self.score < -0.5:
            return "an image could not be read, or has too little detail to compare"
        how = [f"{self.scale:.0%} of the side" if self.scale < 0.99 else "the whole image"]
        if self.mirrored:
            how.append("mirrored")
        if self.angle:
            how.append(f"turned {self.angle:+.0f} degrees")
        fine = f"; {self.fine:.3f} at {FINE_SIDE} px" if self.fine is not None else ""
        return f"aligned grey images correlate {self.score:.3f} ({', '.join(how)}){fine}"

    def as_json(self) -> dict:
        return {"by": "alignment", "score": round(self.score, 4), "reason": self.reason()}


NO_VERDICT = Verdict(-1.0, 1.0, False, 0.0)  # nothing to compare: an image unreadable, or no alignment


def grey_picture(path: str | Path, side: int = SIDE, enlarge: bool = True) -> np.ndarray | None:
    """The image as float32 grey, `side` on its long side (at most its own with enlarge False),
    borders trimmed; None when unreadable."""
    from instret.borders import trim_borders
    from instret.images import ImageReadError, open_rgb

    try:
        img = trim_borders(open_rgb(path, draft=4 * side))
    except (ImageReadError, OSError, ValueError):
        return None
    return _grey(img, side if enlarge else min(side, max(img.size)))


def _grey(img: Image.Image, side: int = SIDE) -> np.ndarray:
    img = img.convert("L")
    f = side / max(img.size)
    size = (max(1, round(img.width * f)), max(1, round(img.height * f)))
    return np.asarray(img.resize(size, Image.BILINEAR), dtype=np.float32)


def compare(a: np.ndarray, b: np.ndarray) -> Verdict:
    """The best alignment of b inside a, or of a inside b, mirrored or not, at every scale and
    view (VIEWS): found on half-size pictures, the best few refined at full size, then scored
    by blocks."""
    coarse = []
    for inner in (False, True):
        image, other = (b, a) if inner else (a, b)
        small_image = _half(image)
        for mirrored in (False, True):
            source = other[:, ::-1] if mirrored else other
            for angle, keep in VIEWS:
                small_template = _half(_view(source, angle, keep))
                for scale in SCALES:
                    score, _ = _best_window(small_image, small_template, scale * keep)
                    coarse.append((score, inner, mirrored, angle, keep, scale))
    ranked = sorted(coarse, reverse=True)
    # A cut template is only its middle, so it skips a caption or a logo near an edge and can
    # outscore the true alignment at half size: the best whole-template ones are refined too.
    # So is the picture as it is, at full scale: a caption bar or a badge can outweigh the rest of
    # a soft photo in a whole-picture correlation and win the coarse search for another window.
    whole = [c for c in ranked if c[4] == 1.0][:REFINED]
    as_is = [(inner, False, 0.0, 1.0, 1.0) for inner in (False, True)]
    best, at = NO_VERDICT, None
    for alignment in dict.fromkeys([c[1:] for c in ranked[:REFINED] + whole] + as_is):
        verdict = _aligned(a, b, *alignment)
        if verdict.score > best.score:
            best, at = verdict, alignment
    if at is None or best.score < REFINE_FROM:
        return best
    # A copy's angle and scale lie anywhere between the grid's (3-12 degrees; a crop of 80 % of
    # the area has 89 % of the side, between 0.84 and 0.92): the steps either side of the best
    # are tried too, angles first (for a turned view), then scales at the best angle.
    inner, mirrored, angle, keep, scale = at
    turns = [(inner, mirrored, t, keep, scale) for t in (angle - ANGLE_STEP, angle + ANGLE_STEP)] if angle else []
    for alignment in turns:
        verdict = _aligned(a, b, *alignment)
        best, at = (verdict, alignment) if verdict.score > best.score else (best, at)
    inner, mirrored, angle, keep, scale = at
    for step in SCALE_STEPS:
        if SCALES[-1] <= scale + step <= SCALES[0]:
            verdict = _aligned(a, b, inner, mirrored, angle, keep, scale + step)
            best = verdict if verdict.score > best.score else best
    return best


def _aligned(a, b, inner: bool, mirrored: bool, angle: float, keep: float, scale: float) -> Verdict:
    """The Verdict of one alignment, searched at full size: a's view (b's when inner) matched
    at its best offset in the other picture; NO_VERDICT when it has too little to compare."""
    image, other = (b, a) if inner else (a, b)
    template = _view(other[:, ::-1] if mirrored else other, angle, keep)
    _, found = _best_window(image, template, scale * keep)
    if found is None:
        return NO_VERDICT
    score = _block_score(*(_detail(x) for x in found))
    return Verdict(score, scale, mirrored, angle, _block_score(*found), min(found[1].shape))


def strictly(verdict: Verdict, fine_a: np.ndarray | None, fine_b: np.ndarray | None) -> Verdict:
    """A copy verdict of compare() checked strictly, for a pair the embedding alone would not
    group: kept only when its template is STRICT_SIDE pixels or more and the pictures at
    FINE_SIDE (fine_a, fine_b: each at most its own size) align at ACCEPT_FINE too; when one
    image has no more than SIDE pixels to show, its SIDE comparison is held to ACCEPT_FINE."""
    if not verdict.copy:
        return verdict
    if verdict.side < STRICT_SIDE or fine_a is None or fine_b is None:
        return replace(verdict, fine=-1.0)
    if min(max(fine_a.shape), max(fine_b.shape)) <= SIDE:
        return replace(verdict, fine=verdict.score)
    return replace(verdict, fine=compare(fine_a, fine_b).score)


def _half(picture: np.ndarray) -> np.ndarray:
    h, w = picture.shape
    img = Image.fromarray(picture).resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _view(picture: np.ndarray, angle: float, keep: float) -> np.ndarray:
    """The picture turned by angle, cut to its middle `keep` of each side (a turned picture's
    corners are not the image's; a middle also aligns a scene shifted by a few pixels)."""
    if angle:
        picture = np.asarray(Image.fromarray(picture).rotate(angle, Image.BILINEAR), dtype=np.float32)
    if keep >= 1.0:
        return picture
    h, w = picture.shape
    mh, mw = round(h * (1 - keep) / 2), round(w * (1 - keep) / 2)
    return picture[mh : h - mh, mw : w - mw]


def _best_window(image: np.ndarray, template: np.ndarray, scale: float):
    """The template, shrunk so that its height is `scale` of the image's (or its width, when
    that binds), correlated with every window of the image: (the best normalised correlation,
    (that window, the shrunk template)); (-1, None) when the template is too small or flat."""
    h, w = image.shape
    th, tw = template.shape
    f = min(scale * h / th, w / tw, h / th)
    size = (max(1, round(tw * f)), max(1, round(th * f)))
    if min(size) < MIN_TEMPLATE:
        return -1.0, None
    t = np.asarray(Image.fromarray(template).resize(size, Image.BILINEAR), dtype=np.float32)
    centred_t = t - t.mean()
    norm = np.sqrt((centred_t * centred_t).sum())
    if norm < 1e-3 * t.size:  # a flat template: nothing to align
        return -1.0, None
    windows = np.lib.stride_tricks.sliding_window_view(image, t.shape)  # (rows, cols, th, tw)
    flat = windows.reshape(-1, t.size)
    centred = flat - flat.mean(axis=1, keepdims=True)
    spread = np.sqrt((centred * centred).sum(axis=1))
    scores = centred @ centred_t.ravel() / np.maximum(spread * norm, 1e-6)
    at = int(scores.argmax())
    row, col = divmod(at, windows.shape[1])
    return float(scores[at]), (windows[row, col], t)


def _detail(picture: np.ndarray) -> np.ndarray:
    """The picture less its blur: the edges and texture that make it this picture, without the
    smooth shading two unrelated pictures can share."""
    radius = int(3 * DETAIL_BLUR)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / DETAIL_BLUR) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(picture, radius, mode="edge")
    blurred = np.apply_along_axis(np.convolve, 0, padded, kernel, mode="valid")
    blurred = np.apply_along_axis(np.convolve, 1, blurred, kernel, mode="valid")
    return picture - blurred.astype(np.float32)


def _block_score(window: np.ndarray, template: np.ndarray) -> float:
    """The median correlation of BLOCKS x BLOCKS blocks of an aligned pair, over the blocks with
    detail: what most of the picture says, whatever a caption or a logo covers (a whole-picture
    correlation also rewards two unrelated photos for sharing a bright sky)."""
    h, w = template.shape
    scores = []
    for rows in np.array_split(np.arange(h), BLOCKS):
        for cols in np.array_split(np.arange(w), BLOCKS):
            x = window[np.ix_(rows, cols)].ravel()
            y = template[np.ix_(rows, cols)].ravel()
            x, y = x - x.mean(), y - y.mean()
            sx, sy = np.sqrt((x * x).sum()), np.sqrt((y * y).sum())
            if min(sx, sy) < FLAT_BLOCK * np.sqrt(len(x)):
                continue  # a flat block: no detail to agree on
            scores.append(float(x @ y / (sx * sy)))
    if len(scores) < MIN_BLOCKS:
        return -1.0
    return float(np.median(scores))


class Verifier:
    """compare() for files (strictly() for some), each decoded once at each size."""

    def __init__(self):
        self._pictures: dict[tuple[str, int], np.ndarray | None] = {}

    def picture(self, path: str, side: int = SIDE) -> np.ndarray | None:
        """SIDE pictures are enlarged when smaller; larger ones (strictly()'s) never are."""
        if (path, side) not in self._pictures:
            self._pictures[(path, side)] = grey_picture(path, side, enlarge=side <= SIDE)
        return self._pictures[(path, side)]

    def __call__(self, path_a: str, path_b: str, strict: bool = False) -> Verdict:
        """strict: checked as strictly() does (the larger pictures are read only for a copy)."""
        a, b = self.picture(path_a), self.picture(path_b)
        if a is None or b is None:
            return NO_VERDICT
        verdict = compare(a, b)
        if strict and verdict.copy:
            verdict = strictly(verdict, self.picture(path_a, FINE_SIDE), self.picture(path_b, FINE_SIDE))
        return verdict


PARALLEL_FROM = 200  # pairs: fewer are checked in this process (a worker takes a second to start)
CHUNK = 64  # pairs a worker checks at a time (neighbouring pairs share files: one decode serves them)


def verify_pairs(jobs: list[tuple[str, str, bool]], workers: int | None = None, progress=None) -> list[Verdict]:
    """The Verdict of each (path a, path b, strict) job, in order: in `workers` processes (None:
    one per usable core) when there are PARALLEL_FROM jobs or more. progress(done, total), when
    given, is called as each CHUNK of jobs is checked (a large folder takes minutes)."""
    from instret.env import usable_cpus

    workers = usable_cpus() if workers is None else workers
    chunks = [jobs[k : k + CHUNK] for k in range(0, len(jobs), CHUNK)]
    if workers <= 1 or len(jobs) < PARALLEL_FROM:
        return _collected(map(_check_chunk, chunks), len(jobs), progress)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the caller may hold torch's and BLAS's threads, which a forked child inherits broken.
    with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        return _collected(pool.map(_check_chunk, chunks), len(jobs), progress)


def _collected(checked_chunks, total: int, progress) -> list[Verdict]:
    """The chunks' verdicts in order, progress told after each."""
    verdicts: list[Verdict] = []
    for chunk in checked_chunks:
        verdicts.extend(chunk)
        if progress is not None:
            progress(len(verdicts), total)
    return verdicts


def _check_chunk(jobs: list[tuple[str, str, bool]]) -> list[Verdict]:
    from threadpoolctl import threadpool_limits

    check = Verifier()
    with threadpool_limits(1):  # one core per worker: the pool is sized to the cores
        return [check(a, b, strict) for a, b, strict in jobs]
