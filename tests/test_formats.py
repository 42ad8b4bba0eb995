"""Phone formats: HEIC (through pillow-heif) and AVIF (Pillow itself) are listed, decoded as the
PNG they were made from, turned upright, held to the pixel limit from their header, and a
damaged one is skipped with its reason; a folder mixing every format trains, indexes, queries
and serves."""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from instret.images import ImageReadError, list_image_files, open_rgb, read_image
from tests.conftest import make_photos

PHONE_FORMATS = {"HEIF": ".heic", "AVIF": ".avif"}


def picture(width=96, height=64, seed=0) -> Image.Image:
    """A photo-like picture: smooth colour fields with a few sharp squares."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.uniform(0, 1, (4, 6, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    a = np.asarray(low).copy()
    for _ in range(4):
        y, x = rng.integers(0, min(width, height) - 12, 2)
        a[y : y + 10, x : x + 10] = rng.integers(0, 256, 3)
    return Image.fromarray(a)


def save(img: Image.Image, path, fmt: str, **options) -> None:
    img.save(path, format=fmt, quality=90, **options)


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
def test_a_phone_format_decodes_as_the_png_it_was_made_from(tmp_path, fmt):
    img = picture()
    save(img, tmp_path / "a.png", "PNG")
    save(img, tmp_path / f"a{PHONE_FORMATS[fmt]}", fmt)
    png = read_image(tmp_path / "a.png", 48).numpy().astype(float)
    phone = read_image(tmp_path / f"a{PHONE_FORMATS[fmt]}", 48).numpy().astype(float)
    assert phone.shape == png.shape == (3, 48, 48)
    # Within what a JPEG at quality 90 of the same picture differs by (chroma is subsampled in all three).
    save(img, tmp_path / "a.jpg", "JPEG")
    jpeg = read_image(tmp_path / "a.jpg", 48).numpy().astype(float)
    assert np.abs(phone - png).mean() <= max(3.0, 2 * np.abs(jpeg - png).mean())
    assert np.abs(phone - png).mean() < np.abs(png - png[:, ::-1]).mean() / 5  # not merely a similar image


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
def test_a_phone_photo_taken_sideways_is_turned_upright(tmp_path, fmt):
    upright = picture(64, 96)
    sideways = upright.rotate(90, expand=True)  # what the sensor recorded; EXIF says turn it back
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    save(sideways, tmp_path / f"a{PHONE_FORMATS[fmt]}", fmt, exif=exif.tobytes())
    got = open_rgb(tmp_path / f"a{PHONE_FORMATS[fmt]}")
    assert got.size == upright.size
    assert np.abs(np.asarray(got, float) - np.asarray(upright, float)).mean() < 6


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
def test_the_pixel_limit_is_read_from_the_header_before_decoding(tmp_path, fmt, monkeypatch):
    path = tmp_path / f"a{PHONE_FORMATS[fmt]}"
    save(picture(), path, fmt)
    decoded = []
    original = Image.Image.load

    def load(self):
        decoded.append(self.format)
        return original(self)

    monkeypatch.setattr(Image.Image, "load", load)
    monkeypatch.setattr(Image.open(path).__class__, "load", load)
    with pytest.raises(ImageReadError, match="6144 pixels, over the limit of 6000"):
        open_rgb(path, max_pixels=6000)
    assert decoded == []
    assert open_rgb(path, max_pixels=6144).size == (96, 64) and decoded


@pytest.mark.parametrize("fmt", PHONE_FORMATS)
def test_a_truncated_phone_file_is_refused_naming_its_format(tmp_path, fmt):
    path = tmp_path / f"a{PHONE_FORMATS[fmt]}"
    save(picture(), path, fmt)
    data = path.read_bytes()
    kind = {"HEIF": "HEIC", "AVIF": "AVIF"}[fmt]
    for keep in (0.3, 0.9):
        path.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(ImageReadError, match=f"damaged or truncated {kind} file"):
            read_image(path, 32)


def test_the_folder_scan_lists_phone_formats_in_any_case(tmp_path):
    for name in ("a.HEIC", "b.heif", "c.avif", "d.jpg", "e.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_image_files(tmp_path)] == ["a.HEIC", "b.heif", "c.avif", "d.jpg"]


def mixed_folder(root):
    """make_photos' JPEGs with every fourth turned into PNG, WebP, HEIC or AVIF, and one
    truncated HEIC: (folder, {converted file: format})."""
    photos = make_photos(root, per_group=8, seed=7)
    kinds = [("PNG", ".png"), ("WEBP", ".webp"), ("HEIF", ".heic"), ("AVIF", ".avif")]
    converted = {}
    for k, path in enumerate(sorted(photos.rglob("*.jpg"))):
        if k % 2:
            fmt, suffix = kinds[(k // 2) % len(kinds)]
            target = path.with_suffix(suffix)
            save(Image.open(path).convert("RGB"), target, fmt)
            path.unlink()
            converted[target] = fmt
    broken = photos / "a" / "broken.heic"
    broken.write_bytes(next(p for p in converted if p.suffix == ".heic").read_bytes()[:200])
    return photos, converted, broken


def test_a_folder_mixing_every_format_trains_indexes_and_finds_a_heic_copy_first(trained_run, tmp_path):
    from instret.indexer import build_index
    from instret.run import train
    from instret.searcher import Searcher

    photos, converted, broken = mixed_folder(tmp_path / "photos")
    assert set(converted.values()) == {"PNG", "WEBP", "HEIF", "AVIF"}
    train({"data": str(photos), "out": str(tmp_path / "run"), "epochs": 1, "image_size": 32, "workers": 0})
    bank = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["bank"]["features"]
    assert len(bank) == 24  # a row for every readable file, whatever its format; the broken one left out
    summary = build_index(photos, trained_run, tmp_path / "ix", workers=0, device="cpu")
    assert summary["vectors"] == 24 and summary["skipped"] == 1
    searcher = Searcher(tmp_path / "ix", device="cpu")
    assert [tuple(row) for row in searcher.index.skipped()] == [("a/broken.heic", "a damaged or truncated HEIC file")]
    # A HEIC copy of one of the JPEGs, as a phone's export would make it, finds that JPEG first.
    jpeg = next(p for p in sorted(photos.rglob("*.jpg")))
    copy = tmp_path / "copy.heic"
    save(Image.open(jpeg).convert("RGB"), copy, "HEIF")
    assert searcher.query([copy], k=3)[0]["results"][0]["path"] == str(jpeg)
    # And each converted file finds itself.
    for path in converted:
        assert searcher.query([path], k=1)[0]["results"][0]["path"] == str(path)


def test_the_server_takes_a_heic_upload_and_shows_a_heic_original_as_jpeg(trained_run, tmp_path):
    from instret.indexer import build_index
    from tests.server_process import Server

    photos = shutil.copytree(trained_run.parent / "photos", tmp_path / "photos")
    original = photos / "b" / "003.jpg"
    heic = original.with_suffix(".heic")
    save(Image.open(original).convert("RGB"), heic, "HEIF")
    original.unlink()
    build_index(photos, trained_run, tmp_path / "ix", workers=0, device="cpu")
    with Server(tmp_path / "ix") as server:
        _, found = server.post("/api/v1/search?k=1&name=mine.heic", heic.read_bytes())
        hit = found["queries"][0]["results"][0]
        assert hit["path"] == str(heic)
        _, body = server.get(f"/api/v1/image/{hit['id']}")
        shown = Image.open(io.BytesIO(body))
        assert shown.format == "JPEG" and shown.size == Image.open(heic).size
