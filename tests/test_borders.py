import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from instret.borders import (
    FLAT_SHARE,
    MAX_SIDE,
    MIN_LINES,
    TOLERANCE,
    WORK_SIDE,
    _an_edge_may_be_flat,
    _depths_from_both_ends,
    border_box,
    trim_borders,
)
from instret.images import square_tensor


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("pad", [(7, 5, 9, 3), (0, 12, 0, 12), (20, 0, 0, 0)])
@pytest.mark.parametrize("fill", [(0, 0, 0), (255, 255, 255), (40, 120, 200)])
def test_a_flat_frame_is_trimmed_to_the_exact_content(pad, fill):
    content = noise(90, 70)
    framed = ImageOps.expand(content, border=pad, fill=fill)
    left, top, right, bottom = pad
    assert border_box(framed) == (left, top, left + 90, top + 70)
    assert np.array_equal(np.asarray(trim_borders(framed)), np.asarray(content))


def test_a_jpeg_copy_of_a_framed_image_is_trimmed_within_its_blocks():
    framed = jpeg(ImageOps.expand(noise(96, 80), border=(16, 24, 16, 24), fill=(0, 0, 0)), quality=30)
    box = np.array(border_box(framed))
    assert np.abs(box - np.array([16, 24, 112, 104])).max() <= 2


def test_without_a_border_the_image_is_returned_unchanged():
    img = noise(64, 48)
    assert border_box(img) == (0, 0, 64, 48)
    assert trim_borders(img) is img


def test_a_single_coloured_image_is_not_a_border():
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    assert border_box(img) == (0, 0, 50, 40)


def test_a_one_pixel_edge_line_is_kept():
    framed = ImageOps.expand(noise(60, 60), border=1, fill=(255, 255, 255))
    assert border_box(framed) == (0, 0, 62, 62)


def test_no_more_than_max_side_is_taken_from_an_edge():
    # A bar half the height at the top: only MAX_SIDE of the height goes.
    img = ImageOps.expand(noise(80, 50), border=(0, 50, 0, 0), fill=(0, 0, 0))
    assert border_box(img) == (0, int(100 * MAX_SIDE), 80, 100)


def test_large_images_are_measured_on_a_reduced_copy_and_trim_no_content():
    content = noise(4 * WORK_SIDE, 3 * WORK_SIDE // 2)
    framed = ImageOps.expand(content, border=(100, 60, 100, 60), fill=(255, 255, 255))
    left, top, right, bottom = border_box(framed)
    factor = max(framed.size) // WORK_SIDE
    assert 100 <= left <= 100 + factor and 60 <= top <= 60 + factor
    assert 100 + content.width - factor <= right <= 100 + content.width
    assert 60 + content.height - factor <= bottom <= 60 + content.height


def test_the_encoder_input_of_a_letterboxed_copy_is_the_original_input():
    original = noise(120, 90, seed=3)
    letterboxed = ImageOps.expand(original, border=(0, 15, 0, 15), fill=(0, 0, 0))
    assert np.array_equal(square_tensor(letterboxed, 32).numpy(), square_tensor(original, 32).numpy())


def edge_spreads(img: Image.Image) -> list[int]:
    """The slow reference: each edge's outermost MIN_LINES lines, the largest channel range."""
    a = np.asarray(img).astype(int)
    strips = (a[:, :MIN_LINES], a[:MIN_LINES], a[:, -MIN_LINES:], a[-MIN_LINES:])
    return [int((s.reshape(-1, 3).max(axis=0) - s.reshape(-1, 3).min(axis=0)).max()) for s in strips]


def test_the_quick_edge_check_agrees_with_the_spread_of_each_edge():
    rng = np.random.default_rng(0)
    seen = set()
    for case in range(300):
        w, h = rng.integers(4, 40, size=2)
        a = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        side = case % 5  # 4: no flat edge
        if side < 4:
            # One edge flat but for noise of up to 40 levels in one channel: spreads on both sides of 2 x TOLERANCE.
            base, amplitude = rng.integers(0, 200), rng.integers(0, 41)
            strip = np.full((h, w, 3), base, np.int64)
            strip[..., rng.integers(3)] += rng.integers(0, amplitude + 1, (h, w))
            strip = strip.astype(np.uint8)
            cut = [np.s_[:, :MIN_LINES], np.s_[:MIN_LINES], np.s_[:, -MIN_LINES:], np.s_[-MIN_LINES:]][side]
            a[cut] = strip[cut]
        img = Image.fromarray(a)
        expected = min(edge_spreads(img)) <= 2 * TOLERANCE
        assert _an_edge_may_be_flat(img) == expected, (case, edge_spreads(img))
        seen.add(expected)
    assert seen == {True, False}


def depth_one_line_at_a_time(lines: np.ndarray) -> int:
    """The slow reference: lines (L x M x 3) from one edge inwards, one at a time, while
    FLAT_SHARE of a line's pixels are within TOLERANCE in every channel of the outermost
    line's mean colour (rounded half to even), for at most MAX_SIDE of them."""
    most = int(len(lines) * MAX_SIDE)
    if most < MIN_LINES or lines.shape[1] < 4:
        return 0
    colour = [round(sum(int(p[c]) for p in lines[0]) / lines.shape[1]) for c in range(3)]
    run = 0
    for line in lines[:most]:
        near = sum(all(abs(int(p[c]) - colour[c]) <= TOLERANCE for c in range(3)) for p in line)
        if near / len(line) < FLAT_SHARE:
            break
        run += 1
    return run if run >= MIN_LINES else 0


def test_the_depths_from_both_ends_agree_with_a_line_by_line_count():
    rng = np.random.default_rng(1)
    found = set()
    for case in range(150):
        h, w = (int(v) for v in rng.integers(3, 30, size=2))
        a = rng.integers(0, 256, (h, w, 3))
        pad = rng.integers(0, 8, size=2)  # flat bands at the start and the end, with sparse noise
        for band, colour in (
            (np.s_[: pad[0]], rng.integers(0, 256, 3)),
            (np.s_[h - pad[1] :], rng.integers(0, 256, 3)),
        ):
            a[band] = colour + rng.integers(-TOLERANCE - 4, TOLERANCE + 5, a[band].shape) * (
                rng.random(a[band].shape) < 0.05
            )
        a = np.clip(a, 0, 255).astype(np.uint8)
        got = _depths_from_both_ends(a)
        assert got == (depth_one_line_at_a_time(a), depth_one_line_at_a_time(a[::-1])), case
        found.update(got)
    assert 0 in found and len(found) > 3  # the cases cover no border and borders of several depths
