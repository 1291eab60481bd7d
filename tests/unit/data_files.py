"""Dataset files written in each real format, for the data tests: the cifar-10-python
batches as Python 2 pickled them (the official files), their .tar.gz, and Hugging Face
style Parquet."""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from model.data import (
    CLASSES,
)

BATCH_ROWS = 20  # per batch: 5 training batches and a test batch


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def random_labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % 10).astype(np.int64)


class Py2Pickler:
    """Writes pickles the way Python 2's cPickle wrote the official CIFAR batches:
    protocol 2, str as BINSTRING, arrays through numpy.core.multiarray._reconstruct."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")

    def dumps(self, obj: object) -> bytes:
        self._save(obj)
        self.out += b"."
        return bytes(self.out)

    def _save(self, obj: object) -> None:
        out = self.out
        if isinstance(obj, bytes):
            if len(obj) < 256:
                out += b"U" + bytes([len(obj)]) + obj
            else:
                out += b"T" + struct.pack("<i", len(obj)) + obj
        elif isinstance(obj, bool):
            out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            out += b"J" + struct.pack("<i", obj)
        elif obj is None:
            out += b"N"
        elif isinstance(obj, tuple):
            out += b"("
            for item in obj:
                self._save(item)
            out += b"t"
        elif isinstance(obj, list):
            out += b"](" if obj else b"]"
            for item in obj:
                self._save(item)
            if obj:
                out += b"e"
        elif isinstance(obj, dict):
            out += b"}("
            for key, value in obj.items():
                self._save(key)
                self._save(value)
            out += b"u"
        elif isinstance(obj, np.ndarray):
            assert obj.dtype == np.uint8
            out += b"cnumpy.core.multiarray\n_reconstruct\n"
            out += b"cnumpy\nndarray\n"
            self._save((0,))
            out += b"U\x01b\x87R"
            out += b"(J\x01\x00\x00\x00"
            self._save(tuple(obj.shape))
            out += b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
            self._save((3, b"|", None, None, None, -1, -1, 0))
            out += b"b\x89"
            self._save(obj.tobytes())
            out += b"tb"
        else:
            raise TypeError(type(obj))


def batch_dict(images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    return {
        b"batch_label": name.encode(),
        b"labels": [int(x) for x in labels],
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),  # CHW rows
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }


def meta_dict(classes: tuple[str, ...] = CLASSES) -> dict:
    return {
        b"num_cases_per_batch": 10000,
        b"label_names": [c.encode() for c in classes],
        b"num_vis": 3072,
    }


def write_cifar_folder(
    root: Path, seed: int = 0, dumps=None, skip: tuple[str, ...] = (), rows: int = BATCH_ROWS
) -> dict:
    """A cifar-10-batches-py folder under root; returns the arrays it holds."""
    dumps = dumps or (lambda obj: Py2Pickler().dumps(obj))
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = random_images(5 * rows, seed), random_labels(5 * rows, seed + 1)
    test_images, test_labels = random_images(rows, seed + 2), random_labels(rows, seed + 3)
    files = {"batches.meta": meta_dict(),
             "test_batch": batch_dict(test_images, test_labels, "test")}
    for i in range(5):
        part = slice(i * rows, (i + 1) * rows)
        batch = batch_dict(train_images[part], train_labels[part], f"training batch {i + 1} of 5")
        files[f"data_batch_{i + 1}"] = batch
    for name, obj in files.items():
        if name not in skip:
            (folder / name).write_bytes(dumps(obj))
    return {
        "folder": folder,
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }


def write_tarball(folder: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return path


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_parquet(
    path: Path,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    fmt: str = "PNG",
    blobs: list | None = None,
    metadata: dict | None = None,
) -> Path:
    if blobs is None:
        assert images is not None
        blobs = [encode_image(im, fmt) for im in images]
    if labels is None:
        labels = np.arange(len(blobs)) % 10
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    img = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)], img_type)
    table = pa.table({"img": img, "label": pa.array(labels, pa.int64())})
    table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path
