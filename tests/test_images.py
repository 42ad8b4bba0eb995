import os

import numpy as np
import pytest
import torch
from PIL import Image

from instret.images import ImageReadError, list_image_files, open_rgb, read_image, square_tensor


def test_square_tensor_resizes_shorter_side_and_centre_crops():
    # 20 x 40: red, green and blue quarters of the width, then green; shorter side 20 -> 10 makes
    # it 10 x 20, and the centre 10 x 10 is the middle half: green and blue, no red.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10, 0] = pixels[:, 10:20, 1] = pixels[:, 20:30, 2] = pixels[:, 30:, 1] = 255
    t = square_tensor(Image.fromarray(pixels), 10, trim=False)
    assert t.shape == (3, 10, 10) and t.dtype == torch.uint8
    assert t[0, :, 1:].max() == 0 and t[0, :, 0].max() < 64  # the red quarter is cut (its edge bleeds a little)
    assert (t[1, :, 1:4] >= 250).all() and (t[2, :, 6:9] >= 250).all()


def test_read_image_of_several_modes(tmp_path):
    Image.new("L", (30, 30), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("P", (30, 30)).save(tmp_path / "pal.gif")
    for name in ("grey.png", "clear.png", "pal.gif"):
        assert read_image(tmp_path / name, 16).shape == (3, 16, 16)
    # Transparent pixels are composited on white, not black.
    assert read_image(tmp_path / "clear.png", 16).float().mean() == 255


def test_unreadable_files_raise_with_a_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("<html>not an image</html>")
    for name in ("empty.jpg", "text.png"):
        with pytest.raises(ImageReadError):
            read_image(tmp_path / name, 16)


def test_pixel_limit(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(tmp_path / "big.png", 16, max_pixels=5000)


def test_listing_is_recursive_sorted_and_filters_extensions(tmp_path):
    (tmp_path / "b").mkdir()
    for p in ("b/2.JPG", "a.png", "b/1.png", "notes.txt"):
        (tmp_path / p).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)] == ["a.png", "b/1.png", "b/2.JPG"]


def test_jpeg_draft_decoding_gives_the_full_decode_within_two_levels(tmp_path):
    # read_image decodes a JPEG at 1/2, 1/4 or 1/8 scale when the target is that small (Image.draft).
    rng = np.random.default_rng(0)
    low = (rng.uniform(0, 1, (12, 16, 3)) * 255).astype(np.uint8)
    photo = Image.fromarray(low).resize((640, 480), Image.BICUBIC)
    path = tmp_path / "photo.jpg"
    photo.save(path, quality=92)
    for size in (32, 64):
        drafted = open_rgb(path, draft=size)
        assert drafted.size[1] < 480  # the draft did take a smaller scale
        fast = square_tensor(drafted, size, trim=False).float()
        full = square_tensor(open_rgb(path), size, trim=False).float()
        assert (fast - full).abs().mean() < 2.0 and torch.equal(read_image(path, size), square_tensor(drafted, size))


def test_a_cameras_multi_picture_jpeg_decodes_like_its_first_picture(tmp_path):
    # MPO: a JPEG followed by more pictures (a depth map, say). Its first picture is drafted and
    # decoded as that JPEG alone would be; the file is not held open by the returned image.
    rng = np.random.default_rng(1)
    first, second = (Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(2))
    first.save(tmp_path / "alone.jpg", quality=90)
    first.save(tmp_path / "camera.jpg", "MPO", save_all=True, append_images=[second], quality=90)
    camera = Image.open(tmp_path / "camera.jpg")
    assert camera.format == "MPO" and camera.n_frames == 2
    camera.close()
    assert torch.equal(read_image(tmp_path / "camera.jpg", 32), read_image(tmp_path / "alone.jpg", 32))
    img = open_rgb(tmp_path / "camera.jpg", draft=32)
    assert img.size == (50, 38)  # drafted at 1/8
    alone = open_rgb(tmp_path / "alone.jpg", draft=32)  # one picture: returned as decoded, not copied
    assert alone.size == (50, 38)
    assert {str(tmp_path / "camera.jpg"), str(tmp_path / "alone.jpg")}.isdisjoint(open_files())


def open_files() -> set[str]:
    """The files this process holds open (Linux)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used, closed since
            pass
    return found
