"""Image files as network input: a PNG or JPEG of any size, as one (32, 32, 3) uint8 image,
made the way the README's `predict` section describes (EXIF orientation, RGB, centre square,
Lanczos to 32x32).

Files are untrusted: only the PNG and JPEG decoders see them, and the pixel count in the
header is checked before anything is decoded, so a small file that declares an enormous
image (a decompression bomb) is refused without expanding it in memory.
"""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import UserError

SIZE = 32
FORMATS = ("PNG", "JPEG")
# 40 megapixels: beyond any ordinary camera photo; decoding one takes ~120 MB of RGB.
MAX_PIXELS = 40_000_000
MAX_FILE_BYTES = 64 * 2**20


class ImageFileError(UserError, ValueError):
    """A file that cannot be read as a PNG or JPEG image of a sane size."""


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """(32, 32, 3) uint8 RGB from the image file at `path`."""
    try:  # non-blocking: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ImageFileError(f"cannot read it: {exc.strerror or exc}") from None
    if not stat.S_ISREG((st := os.fstat(fd)).st_mode):
        os.close(fd)
        raise ImageFileError("not a regular file (a folder, FIFO, socket or device)")
    with open(fd, "rb") as f:
        if st.st_size > MAX_FILE_BYTES:
            raise ImageFileError(f"the file is {st.st_size / 2**20:.0f} MiB, over the "
                                 f"{MAX_FILE_BYTES // 2**20} MiB limit for an image")
        try:
            with warnings.catch_warnings():
                # Pillow's own bomb warning: the explicit check below decides.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f, formats=FORMATS) as im:  # reads the header only
                    _check_pixels(*im.size)
                    return _to_input(im)
        except Image.DecompressionBombError:
            # Pillow refuses at twice its own limit, before our check could run.
            raise ImageFileError(f"the image declares more than {2 * Image.MAX_IMAGE_PIXELS:,} "
                                 "pixels: refusing to decode it (a decompression bomb?)") from None
        except UnidentifiedImageError:
            f.seek(0)
            raise ImageFileError(f"not a PNG or JPEG image ({st.st_size} bytes starting "
                                 f"{f.read(8)!r})") from None
        except OSError as exc:  # truncated or corrupt data, or a read error
            raise ImageFileError(f"cannot decode it: {exc}") from None


def _check_pixels(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageFileError(f"the image is {width}x{height}: it has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageFileError(
            f"the image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{MAX_PIXELS:,}: refusing to decode it (a decompression bomb?)")


def _to_input(im: Image.Image) -> np.ndarray:
    if im.format == "JPEG":
        # Decode at a reduced scale (still >= 2x the target) where the JPEG allows it:
        # a 12-megapixel photo decodes in a fraction of the time and memory.
        im.draft("RGB", (2 * SIZE, 2 * SIZE))
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I"):  # 16-bit grayscale: Pillow's conversion would clip at 255
        im = Image.fromarray(np.round(np.asarray(im, np.float32) / 257).astype(np.uint8))
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (SIZE, SIZE):
        im = ImageOps.fit(im, (SIZE, SIZE), method=Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8).copy()  # (32, 32, 3)
