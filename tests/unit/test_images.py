"""Image files as network input: any PNG or JPEG made 32x32 the documented way, and files
that are not images, or that declare absurd dimensions, refused before decoding."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.images import MAX_PIXELS, ImageFileError, load_image


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG signature and IHDR chunk declaring width x height, and no pixel data: only a
    header check can refuse it; decoding it would fail differently."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_a_32x32_png_is_taken_pixel_for_pixel(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out, pixels)


def test_a_large_jpeg_is_centre_cropped_to_a_square_then_resized(tmp_path):
    # 640x480: red | green | blue in vertical bands of 80, 480 and 80 pixels. The centred
    # 480x480 square is the green band only: no red or blue may reach the 32x32 image.
    image = np.zeros((480, 640, 3), np.uint8)
    image[:, :80, 0] = 255
    image[:, 80:560, 1] = 255
    image[:, 560:, 2] = 255
    Image.fromarray(image).save(tmp_path / "photo.jpg", quality=95)
    out = load_image(tmp_path / "photo.jpg").astype(int)
    assert out.shape == (32, 32, 3)
    assert out[..., 1].min() > 200 and out[..., 0].max() < 40 and out[..., 2].max() < 40


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16"])
def test_every_png_mode_becomes_rgb(tmp_path, mode):
    Image.new("RGB", (50, 70), (10, 200, 30)).convert(mode).save(tmp_path / "m.png")
    out = load_image(tmp_path / "m.png")
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_a_file_that_is_not_an_image_is_refused_by_name(tmp_path):
    (tmp_path / "notes.png").write_text("ID,Labels\n0,1\n")
    with pytest.raises(ImageFileError, match=r"not a PNG or JPEG image \(14 bytes starting "):
        load_image(tmp_path / "notes.png")


def test_other_image_formats_are_not_decoded(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.gif")
    with pytest.raises(ImageFileError, match="not a PNG or JPEG image"):
        load_image(tmp_path / "x.gif")


def test_a_truncated_png_cannot_be_decoded(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFileError, match="cannot decode it"):
        load_image(tmp_path / "t.png")


def test_a_missing_file_cannot_be_read(tmp_path):
    with pytest.raises(ImageFileError, match="cannot read it: No such file"):
        load_image(tmp_path / "absent.png")


@pytest.mark.parametrize(("width", "height"), [
    (7_000, MAX_PIXELS // 7_000 + 1),  # just over the cap, under Pillow's own limit
    (100_000, 100_000),  # 10 gigapixels: Pillow's own limit
])
def test_absurd_dimensions_are_refused_from_the_header(tmp_path, width, height):
    bomb = _png_header_only(tmp_path / "bomb.png", width, height)
    assert bomb.stat().st_size < 100
    with pytest.raises(ImageFileError, match="decompression bomb"):
        load_image(bomb)


def test_an_image_at_the_cap_is_not_refused_for_its_size(tmp_path):
    # The same header-only file at an allowed size fails later, at decoding.
    with pytest.raises(ImageFileError, match="cannot decode it"):
        load_image(_png_header_only(tmp_path / "ok.png", 4_000, 3_000))
