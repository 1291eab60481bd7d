"""Image inputs decoded wrongly, or not at all, without a word: every pixel format a PNG
or JPEG decodes to gives the image's own colours (16-bit grayscale used to clip to
white), a FIFO or other non-regular file is refused instead of hanging `predict`, every
entry of a folder that is named like an image is classified or reported, and a control
character in a file's name cannot break or forge a line of the output."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.predict import read_inputs, run, table
from model.images import ImageFileError, load_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(depth: int, color_type: int, samples: tuple[int, ...], extra: bytes = b"") -> bytes:
    """A 32x32 PNG of one colour, written by hand: Pillow cannot write most of these."""
    bits = "".join(format(v, f"0{depth}b") for v in samples * 32)
    row = b"\0" + int(bits, 2).to_bytes(-(-len(bits) // 8), "big")  # filter 0, packed
    header = struct.pack(">IIBBBBB", 32, 32, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra
            + _chunk(b"IDAT", zlib.compress(row * 32)) + _chunk(b"IEND", b""))


def _scaled(v: int, depth: int) -> int:
    return round(v * 255 / (2**depth - 1))


GRAY = {1: 1, 2: 1, 4: 6, 8: 102, 16: 26214}  # a sample per bit depth
RGB16 = (26214, 13107, 52428)
PALETTE = b"\x66\x33\xcc" * 2
CASES = {  # name: (file bytes, expected RGB)
    **{f"gray {d}-bit": (_png(d, 0, (GRAY[d],)), (_scaled(GRAY[d], d),) * 3) for d in GRAY},
    **{f"gray {d}-bit, transparent": (_png(d, 0, (GRAY[d],), _chunk(b"tRNS", b"\0\0")),
                                      (_scaled(GRAY[d], d),) * 3) for d in (1, 16)},
    "rgb 8-bit": (_png(8, 2, (102, 51, 204)), (102, 51, 204)),
    "rgb 16-bit": (_png(16, 2, RGB16), (102, 51, 204)),
    **{f"palette {d}-bit": (_png(d, 3, (1,), _chunk(b"PLTE", PALETTE)), (102, 51, 204))
       for d in (1, 2, 4, 8)},
    "palette, transparent": (_png(8, 3, (1,), _chunk(b"PLTE", PALETTE) + _chunk(b"tRNS", b"\0")),
                             (102, 51, 204)),
    "gray+alpha 8-bit": (_png(8, 4, (102, 0)), (102,) * 3),
    "gray+alpha 16-bit": (_png(16, 4, (26214, 0)), (102,) * 3),
    "rgba 8-bit": (_png(8, 6, (102, 51, 204, 0)), (102, 51, 204)),
    "rgba 16-bit": (_png(16, 6, (*RGB16, 65535)), (102, 51, 204)),
}


def _jpeg(mode: str, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (32, 32), colour).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


JPEGS = {"jpeg L": (_jpeg("L", 102), (102,) * 3),
         "jpeg RGB": (_jpeg("RGB", (102, 51, 204)), (102, 51, 204)),
         "jpeg CMYK": (_jpeg("CMYK", (153, 204, 51, 0)),  # as Pillow converts CMYK
                       Image.new("CMYK", (1, 1), (153, 204, 51, 0)).convert("RGB").getpixel((0,
                                                                                           0)))}


@pytest.mark.parametrize("name", [*CASES, *JPEGS])
def test_every_pixel_format_keeps_its_colours(name, tmp_path):
    data, expected = {**CASES, **JPEGS}[name]
    path = tmp_path / "image.png"
    path.write_bytes(data)
    with Image.open(path) as im:
        mode = im.mode
    image = load_image(path).astype(int)  # (32, 32, 3)
    tolerance = 4 if name.startswith("jpeg") else 1
    assert np.abs(image - expected).max() <= tolerance, (mode, image[0, 0], expected)


def test_the_formats_cover_every_mode_a_png_or_jpeg_decodes_to(tmp_path):
    modes = set()
    for data, _ in [*CASES.values(), *JPEGS.values()]:
        with Image.open(io.BytesIO(data)) as im:
            modes.add(im.mode)
    assert modes == {"1", "L", "P", "RGB", "LA", "RGBA", "I;16", "CMYK"}


def _in_thread(fn, *args):
    """fn(*args) on a thread: its result or exception, or a failure after 5 s."""
    out: list = []

    def call() -> None:
        try:
            out.append((fn(*args), None))
        except Exception as exc:
            out.append((None, exc))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), f"{fn.__name__} hung"
    result, exc = out[0]
    if exc is not None:
        raise exc
    return result


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageFileError, match="not a regular file"):
        _in_thread(load_image, fifo)
    inputs = _in_thread(read_inputs, [str(fifo)])
    assert inputs.failures == [(str(fifo), "not a regular file (a folder, FIFO, socket or "
                                            "device)")]


def test_every_entry_of_a_folder_named_like_an_image_is_read_or_reported(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(CASES["rgb 8-bit"][0])
    os.mkfifo(folder / "b.png")
    (folder / "c.jpg").mkdir()
    (folder / "d.jpeg").symlink_to(tmp_path / "missing.jpeg")
    (folder / "notes.txt").write_text("not an image name: skipped")
    inputs = _in_thread(read_inputs, [str(folder)])
    assert inputs.names == [str(folder / "a.png")]
    failed = dict(inputs.failures)
    assert sorted(Path(name).name for name in failed) == ["b.png", "c.jpg", "d.jpeg"]
    assert "not a regular file" in failed[str(folder / "b.png")]
    assert "not a regular file" in failed[str(folder / "c.jpg")]
    assert "No such file" in failed[str(folder / "d.jpeg")]


def test_control_characters_in_names_cannot_break_or_forge_lines(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    forged = "a.png\nship            99.9%\x1b[2K\r"  # a second row, then erase the line
    (folder / f"{forged}.png").write_bytes(CASES["rgb 8-bit"][0])
    (folder / "x\nerror: forged.png").write_bytes(b"not an image")
    inputs = read_inputs([str(folder)])
    result = {"model": {"name": "m", "version": "1", "variant": "light", "tta": False},
              "predictions": [{"file": n, "class": "cat", "confidence": 0.5}
                              for n in inputs.names]}
    lines = table(result).split("\n")
    assert len(lines) == 3 and "\\nship" in lines[2] and "\\x1b" in lines[2]
    assert not any(c in lines[2] for c in "\r\x1b")
    code = run([str(folder / "x\nerror: forged.png")], "models:/m/1", tta=False,
               device="cpu", as_json=False, out=io.StringIO(), err=(err := io.StringIO()))
    assert code == 1
    assert [line.startswith("error: ") for line in err.getvalue().splitlines()] == [True] * 2
    assert "x\\nerror: forged.png" in err.getvalue()
