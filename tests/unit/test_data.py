"""model.data: every source format, the digest, the split, the decode cache, URIs, errors.

Fixtures are written here in each real format: the cifar-10-python batches as Python 2
pickled them (the official files), their .tar.gz, and Hugging Face style Parquet.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import sys
import tarfile
import time
import types
import urllib.error
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.data import (
    CLASSES,
    InvalidInputError,
    Split,
    content_digest,
    decode,
    load_arrays,
    load_dataset,
    open_uri,
    parquet,
    read_bytes,
    sources,
    stratified_split,
)
from model.data import cifar as cifar_module

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
SHARED_PARQUET = SHARED / "cifar10-jpeg" / "train.parquet"

BATCH_ROWS = 20  # per batch: 5 training batches and a test batch


# ------------------------------------------------------------------ fixture writers


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % 10).astype(np.int64)


class _Py2Pickler:
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


def _batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    return {
        b"batch_label": name.encode(),
        b"labels": [int(x) for x in labels],
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),  # CHW rows
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }


def _meta(classes: tuple[str, ...] = CLASSES) -> dict:
    return {
        b"num_cases_per_batch": 10000,
        b"label_names": [c.encode() for c in classes],
        b"num_vis": 3072,
    }


def write_cifar_folder(
    root: Path, seed: int = 0, dumps=None, skip: tuple[str, ...] = (), rows: int = BATCH_ROWS
) -> dict:
    """A cifar-10-batches-py folder under root; returns the arrays it holds."""
    dumps = dumps or (lambda obj: _Py2Pickler().dumps(obj))
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images, train_labels = _images(5 * rows, seed), _labels(5 * rows, seed + 1)
    test_images, test_labels = _images(rows, seed + 2), _labels(rows, seed + 3)
    files = {"batches.meta": _meta(), "test_batch": _batch(test_images, test_labels, "test")}
    for i in range(5):
        part = slice(i * rows, (i + 1) * rows)
        batch = _batch(train_images[part], train_labels[part], f"training batch {i + 1} of 5")
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


def _encode(image: np.ndarray, fmt: str) -> bytes:
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
        blobs = [_encode(im, fmt) for im in images]
    if labels is None:
        labels = np.arange(len(blobs)) % 10
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    img = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)], img_type)
    table = pa.table({"img": img, "label": pa.array(labels, pa.int64())})
    table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cifar(tmp_path: Path) -> dict:
    return write_cifar_folder(tmp_path / "src")


@pytest.fixture
def png_parquet(tmp_path: Path) -> dict:
    images, labels = _images(60, 7), _labels(60, 8)
    path = write_parquet(tmp_path / "train.parquet", images, labels, "PNG")
    return {"path": path, "images": images, "labels": labels}


# ------------------------------------------------------------------------- sources


def test_folder_reads_official_layout(cifar: dict, cache: Path) -> None:
    raw = load_arrays(str(cifar["folder"]), cache_dir=cache)
    np.testing.assert_array_equal(raw.train_images, cifar["train_images"])
    np.testing.assert_array_equal(raw.train_labels, cifar["train_labels"])
    np.testing.assert_array_equal(raw.test_images, cifar["test_images"])
    np.testing.assert_array_equal(raw.test_labels, cifar["test_labels"])
    assert raw.classes == CLASSES
    assert raw.train_images.dtype == np.uint8 and raw.train_images.flags.c_contiguous
    assert raw.train_labels.dtype == np.int64


def test_folder_may_be_the_parent_of_the_batches(cifar: dict, cache: Path) -> None:
    inner = load_arrays(str(cifar["folder"]), cache_dir=cache)
    outer = load_arrays(str(cifar["folder"].parent), cache_dir=cache)
    assert outer.digest == inner.digest


@pytest.mark.parametrize("protocol", [2, 4])
def test_folder_pickled_by_python3(tmp_path: Path, cache: Path, protocol: int) -> None:
    src = write_cifar_folder(tmp_path, dumps=lambda obj: pickle.dumps(obj, protocol=protocol))
    raw = load_arrays(str(src["folder"]), cache_dir=cache)
    np.testing.assert_array_equal(raw.train_images, src["train_images"])
    np.testing.assert_array_equal(raw.test_labels, src["test_labels"])


def test_tarball_matches_folder(cifar: dict, tmp_path: Path, cache: Path) -> None:
    tarball = write_tarball(cifar["folder"], tmp_path / "cifar-10-python.tar.gz")
    from_tar = load_arrays(str(tarball), cache_dir=cache)
    from_dir = load_arrays(str(cifar["folder"]), cache_dir=cache)
    assert from_tar.digest == from_dir.digest
    np.testing.assert_array_equal(from_tar.train_images, cifar["train_images"])
    np.testing.assert_array_equal(from_tar.test_images, cifar["test_images"])
    assert not (tmp_path / "cifar-10-batches-py").exists()  # read in place, not extracted


def test_parquet_png_round_trips_exactly(png_parquet: dict, cache: Path) -> None:
    raw = load_arrays(str(png_parquet["path"]), cache_dir=cache)
    np.testing.assert_array_equal(raw.train_images, png_parquet["images"])
    np.testing.assert_array_equal(raw.train_labels, png_parquet["labels"])
    assert raw.test_images is None and raw.test_labels is None
    assert raw.classes == CLASSES
    # A train-only source is digested like a Split of its rows.
    assert raw.digest == content_digest(png_parquet["images"], png_parquet["labels"])


def test_parquet_jpeg_decodes_like_pillow(tmp_path: Path, cache: Path) -> None:
    images = _images(20, 3)
    blobs = [_encode(im, "JPEG") for im in images]
    path = write_parquet(tmp_path / "jpeg.parquet", blobs=blobs)
    raw = load_arrays(str(path), cache_dir=cache)
    expected = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    np.testing.assert_array_equal(raw.train_images, expected)


def test_parquet_converts_other_modes_to_rgb(tmp_path: Path, cache: Path) -> None:
    gray = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    rgba = np.dstack([_images(1, 0)[0], np.full((32, 32), 7, np.uint8)])
    blobs = []
    for array in (gray, rgba):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    raw = load_arrays(str(write_parquet(tmp_path / "modes.parquet", blobs=blobs)), cache_dir=cache)
    np.testing.assert_array_equal(raw.train_images[0], np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(raw.train_images[1], rgba[..., :3])


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"classes": ",".join(f"c{i}" for i in range(10))}, tuple(f"c{i}" for i in range(10))),
        ({"classes": json.dumps([f"j{i}" for i in range(10)])}, tuple(f"j{i}" for i in range(10))),
        (
            {
                "huggingface": json.dumps(
                    {"info": {"features": {"label": {"names": [f"h{i}" for i in range(10)]}}}}
                )
            },
            tuple(f"h{i}" for i in range(10)),
        ),
        ({"other": "x"}, CLASSES),
    ],
)
def test_parquet_class_names_from_metadata(
    tmp_path: Path, cache: Path, metadata: dict, expected: tuple
) -> None:
    path = write_parquet(tmp_path / "m.parquet", _images(10, 0), metadata=metadata)
    assert load_arrays(str(path), cache_dir=cache).classes == expected


def test_torchvision_source_reads_the_download(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, download))
            if not (Path(root) / "cifar-10-batches-py").exists():
                self.written = write_cifar_folder(Path(root))

    _fake_torchvision(monkeypatch, FakeCIFAR10)
    raw = load_arrays("torchvision", cache_dir=cache)
    assert calls == [(str(cache / "torchvision"), True)]
    assert raw.test_images is not None and len(raw.train_labels) == 5 * BATCH_ROWS
    root = tmp_path / "tv-root"
    assert load_arrays(f"torchvision:{root}", cache_dir=cache).digest == raw.digest
    assert calls[-1] == (str(root), True)


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
        OSError("Network is unreachable"),
        RuntimeError("Error downloading cifar-10-python.tar.gz"),
    ],
)
def test_torchvision_offline_is_invalid_input(
    cache: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    class OfflineCIFAR10:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise error

    _fake_torchvision(monkeypatch, OfflineCIFAR10)
    with pytest.raises(InvalidInputError, match=r"looks offline.*local path or an s3:// URI"):
        load_arrays("torchvision", cache_dir=cache)


def _fake_torchvision(monkeypatch: pytest.MonkeyPatch, cifar10: type) -> None:
    """Stands in for torchvision (importing the real one costs seconds; nothing is online)."""
    package = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    datasets.CIFAR10 = cifar10  # type: ignore[attr-defined]
    package.datasets = datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_kind_is_sniffed_from_magic_bytes(png_parquet: dict, cifar: dict, tmp_path: Path) -> None:
    parquet = tmp_path / "noext"
    parquet.write_bytes(png_parquet["path"].read_bytes())
    tarball = write_tarball(cifar["folder"], tmp_path / "tb")
    assert len(load_arrays(str(parquet), cache_dir=tmp_path / "c").train_labels) == 60
    assert load_arrays(str(tarball), cache_dir=tmp_path / "c").test_images is not None


# ------------------------------------------------------------------------- digest


def test_content_digest_is_stable_and_sensitive() -> None:
    images, labels = _images(8, 0), _labels(8, 0)
    digest = content_digest(images, labels)
    assert digest == content_digest(images.copy(), labels.astype(np.int32))
    assert len(digest) == 64 and int(digest, 16) >= 0

    flipped = images.copy()
    flipped[3, 17, 5, 1] ^= 1
    assert content_digest(flipped, labels) != digest
    relabeled = labels.copy()
    relabeled[0] = (relabeled[0] + 1) % 10
    assert content_digest(images, relabeled) != digest
    # Same bytes, another shape: the header tells them apart.
    assert content_digest(images.reshape(16, 16, 32, 3), labels) != digest


def test_split_digest_is_cached_and_matches(png_parquet: dict) -> None:
    split = Split(png_parquet["images"], png_parquet["labels"])
    assert len(split) == 60
    assert split.digest == content_digest(png_parquet["images"], png_parquet["labels"])
    assert split.digest is split.digest


@pytest.mark.parametrize(
    ("images", "labels"),
    [
        (np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int64)),
        (np.zeros((2, 3, 32, 32), np.uint8), np.zeros(2, np.int64)),
        (np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3, np.int64)),
        (np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.int32)),
    ],
)
def test_split_rejects_malformed_arrays(images: np.ndarray, labels: np.ndarray) -> None:
    with pytest.raises(InvalidInputError):
        Split(images, labels)


def test_dataset_digest_covers_the_whole_source(cifar: dict, cache: Path) -> None:
    a = load_dataset(str(cifar["folder"]), val_size=10, seed=0, cache_dir=cache)
    b = load_dataset(str(cifar["folder"]), val_size=30, seed=5, train_size=20, cache_dir=cache)
    assert a.digest == b.digest  # splitting and subsetting do not change the source digest
    assert a.digest != content_digest(cifar["train_images"], cifar["train_labels"])
    assert a.train.digest != b.train.digest


# ------------------------------------------------------------------------- splits


def _check_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    train_idx, val_idx = stratified_split(labels, val_size, seed)
    assert len(val_idx) == val_size
    assert np.intersect1d(train_idx, val_idx).size == 0
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train_idx, val_idx])), np.arange(len(labels))
    )
    assert train_idx.dtype == np.int64 and val_idx.dtype == np.int64
    counts = np.bincount(labels, minlength=labels.max() + 1)
    proportional = counts * val_size / len(labels)
    got = np.bincount(labels[val_idx], minlength=len(counts))
    assert np.all(np.abs(got - proportional) < 1), (got, proportional)
    return train_idx, val_idx


def test_stratified_split_is_deterministic_disjoint_covering() -> None:
    labels = _labels(1000, 0)
    first = _check_split(labels, 100, seed=0)
    again = _check_split(labels, 100, seed=0)
    other = _check_split(labels, 100, seed=1)
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])
    assert np.all(np.bincount(labels[first[1]]) == 10)


def test_stratified_split_uneven_classes_rounds_by_largest_remainder() -> None:
    labels = np.repeat(np.arange(4), [7, 13, 30, 50])
    _, val_idx = _check_split(labels, 20, seed=3)
    assert np.bincount(labels[val_idx]).tolist() == [1, 3, 6, 10]
    for val_size in (1, 2, 3, 37, 99):
        _check_split(labels, val_size, seed=val_size)


def test_stratified_split_edges() -> None:
    labels = _labels(50, 1)
    train_idx, val_idx = stratified_split(labels, 0, seed=0)
    assert len(val_idx) == 0 and train_idx.tolist() == list(range(50))
    for bad in (50, 51):
        with pytest.raises(InvalidInputError, match="smaller val_size"):
            stratified_split(labels, bad, seed=0)
    with pytest.raises(InvalidInputError, match="non-negative"):
        stratified_split(labels, -1, seed=0)


def test_load_dataset_holds_out_a_stratified_validation_split(cifar: dict, cache: Path) -> None:
    ds = load_dataset(str(cifar["folder"]), val_size=20, seed=0, cache_dir=cache)
    assert (len(ds.train), len(ds.val)) == (80, 20)
    assert np.bincount(ds.val.labels, minlength=10).tolist() == [2] * 10
    assert ds.test is not None and len(ds.test) == BATCH_ROWS
    assert ds.classes == CLASSES and ds.source == str(cifar["folder"])
    # Every held-out row is one of the training rows, and none is left in train.
    all_rows = {im.tobytes() for im in cifar["train_images"]}
    val_rows = {im.tobytes() for im in ds.val.images}
    train_rows = {im.tobytes() for im in ds.train.images}
    assert val_rows <= all_rows and train_rows <= all_rows and not val_rows & train_rows
    assert ds.train.images.flags.c_contiguous and ds.val.images.flags.c_contiguous


def test_train_size_keeps_a_stratified_subset_after_the_hold_out(cifar: dict, cache: Path) -> None:
    full = load_dataset(str(cifar["folder"]), val_size=20, seed=4, cache_dir=cache)
    small = load_dataset(str(cifar["folder"]), val_size=20, seed=4, train_size=30, cache_dir=cache)
    assert len(small.train) == 30
    assert np.bincount(small.train.labels, minlength=10).tolist() == [3] * 10
    assert small.val.digest == full.val.digest  # the hold-out does not depend on train_size
    full_rows = {im.tobytes() for im in full.train.images}
    assert all(im.tobytes() in full_rows for im in small.train.images)
    same = load_dataset(str(cifar["folder"]), val_size=20, seed=4, train_size=80, cache_dir=cache)
    assert same.train.digest == full.train.digest
    for bad in (0, 81, -5):
        with pytest.raises(InvalidInputError, match="train_size"):
            load_dataset(str(cifar["folder"]), val_size=20, train_size=bad, cache_dir=cache)


def test_val_size_larger_than_the_source_is_invalid(png_parquet: dict, cache: Path) -> None:
    with pytest.raises(InvalidInputError, match="val_size=5000"):
        load_dataset(str(png_parquet["path"]), cache_dir=cache)


# ------------------------------------------------------------------------ cache


def test_second_load_comes_from_the_cache(
    png_parquet: dict, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_arrays(str(png_parquet["path"]), cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    def no_decode(*args: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(sources, "_decode_source", no_decode)
    monkeypatch.setattr(parquet, "decode_images", no_decode)
    second = load_arrays(str(png_parquet["path"]), cache_dir=cache)
    assert second.digest == first.digest
    np.testing.assert_array_equal(second.train_images, first.train_images)
    np.testing.assert_array_equal(second.train_labels, first.train_labels)
    assert second.classes == first.classes and second.test_images is None


def test_folder_cache_keeps_the_test_split(
    cifar: dict, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_arrays(str(cifar["folder"]), cache_dir=cache)
    monkeypatch.setattr(sources, "_decode_source", lambda *a: pytest.fail("decoded again"))
    second = load_arrays(str(cifar["folder"]), cache_dir=cache)
    assert second.digest == first.digest
    assert second.test_images is not None and first.test_images is not None
    np.testing.assert_array_equal(second.test_images, first.test_images)
    np.testing.assert_array_equal(second.test_labels, first.test_labels)


def test_cache_key_follows_the_bytes(cifar: dict, tmp_path: Path, cache: Path) -> None:
    first = load_arrays(str(cifar["folder"]), cache_dir=cache)
    other = write_cifar_folder(tmp_path / "other", seed=100)
    (cifar["folder"] / "data_batch_2").write_bytes((other["folder"] / "data_batch_2").read_bytes())
    second = load_arrays(str(cifar["folder"]), cache_dir=cache)
    assert second.digest != first.digest
    assert len(list(cache.glob("*.npz"))) == 2


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a zip file at all")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _float_images(path: Path) -> None:
    with np.load(path) as z:
        arrays = dict(z)
    arrays["train_images"] = arrays["train_images"].astype(np.float32)
    with path.open("wb") as f:
        np.savez(f, **arrays)


def _flip_pixel(path: Path) -> None:
    with np.load(path) as z:
        arrays = dict(z)
    arrays["train_images"][0, 0, 0, 0] ^= 1
    with path.open("wb") as f:
        np.savez(f, **arrays)


def _pickled_object(path: Path) -> None:
    with path.open("wb") as f:
        np.savez(f, train_images=np.array([object()], dtype=object))


@pytest.mark.parametrize(
    "corrupt", [_garbage, _truncate, _float_images, _flip_pixel, _pickled_object]
)
def test_corrupt_cache_is_ignored_and_rewritten(
    png_parquet: dict, cache: Path, monkeypatch: pytest.MonkeyPatch, corrupt
) -> None:
    first = load_arrays(str(png_parquet["path"]), cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    corrupt(cache_file)
    decoded = []
    real = sources._decode_source
    monkeypatch.setattr(sources, "_decode_source", lambda *a: decoded.append(1) or real(*a))
    second = load_arrays(str(png_parquet["path"]), cache_dir=cache)
    assert decoded == [1]
    assert second.digest == first.digest
    np.testing.assert_array_equal(second.train_images, png_parquet["images"])
    third = load_arrays(str(png_parquet["path"]), cache_dir=cache)  # rewritten: no decode
    assert decoded == [1] and third.digest == first.digest


def test_cache_dir_defaults_to_the_environment(
    png_parquet: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIFAR10_CACHE_DIR", str(tmp_path / "env-cache"))
    load_arrays(str(png_parquet["path"]))
    assert len(list((tmp_path / "env-cache").glob("*.npz"))) == 1


def test_unwritable_cache_does_not_fail_the_load(png_parquet: dict, tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    raw = load_arrays(str(png_parquet["path"]), cache_dir=blocker / "cache")
    np.testing.assert_array_equal(raw.train_images, png_parquet["images"])


# ------------------------------------------------------------------------- URIs


def test_file_uri(png_parquet: dict, cifar: dict, tmp_path: Path, cache: Path) -> None:
    by_path = load_arrays(str(png_parquet["path"]), cache_dir=cache)
    assert load_arrays(png_parquet["path"].as_uri(), cache_dir=cache).digest == by_path.digest
    spaced = tmp_path / "with space" / "x.parquet"
    spaced.parent.mkdir()
    spaced.write_bytes(png_parquet["path"].read_bytes())
    assert spaced.as_uri().count("%20") == 1
    assert load_arrays(spaced.as_uri(), cache_dir=cache).digest == by_path.digest
    folder = load_arrays(cifar["folder"].as_uri(), cache_dir=cache)
    assert folder.test_images is not None
    ds = load_dataset(png_parquet["path"].as_uri(), val_size=10, cache_dir=cache)
    assert ds.source == png_parquet["path"].as_uri()
    assert load_dataset(png_parquet["path"], val_size=10, cache_dir=cache).source == str(
        png_parquet["path"]
    )


def test_read_bytes_and_open_uri(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"0123456789")
    assert read_bytes(str(path)) == b"0123456789"
    assert read_bytes(path.as_uri(), max_bytes=10) == b"0123456789"
    with open_uri(path.as_uri()) as f:
        assert f.read(4) == b"0123"
    with pytest.raises(InvalidInputError, match="more than the limit of 9"):
        read_bytes(str(path), max_bytes=9)
    with pytest.raises(InvalidInputError, match="no such file"):
        open_uri(str(tmp_path / "missing"))


# ------------------------------------------------------------------------- errors


def test_missing_and_unknown_sources(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"no such file: .*nope.parquet"):
        load_arrays(str(tmp_path / "nope.parquet"), cache_dir=cache)
    with pytest.raises(InvalidInputError, match="no such file"):
        load_arrays((tmp_path / "nope").as_uri(), cache_dir=cache)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InvalidInputError, match=r"cannot tell what kind.*Parquet.*s3://"):
        load_arrays(str(text), cache_dir=cache)
    with pytest.raises(InvalidInputError, match="unsupported URI scheme"):
        load_arrays("http://example.com/x.parquet", cache_dir=cache)
    with pytest.raises(InvalidInputError, match="non-empty string"):
        load_arrays("", cache_dir=cache)


def test_corrupt_parquet(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 but not really a parquet file")
    with pytest.raises(InvalidInputError, match="not a Parquet file"):
        load_arrays(str(bad), cache_dir=cache)


@pytest.mark.parametrize("missing", ["img", "label"])
def test_parquet_missing_column(tmp_path: Path, cache: Path, missing: str) -> None:
    path = write_parquet(tmp_path / "p.parquet", _images(3, 0))
    table = pq.read_table(path).drop_columns([missing])
    pq.write_table(table, path)
    with pytest.raises(InvalidInputError, match=f"missing column.*`{missing}`"):
        load_arrays(str(path), cache_dir=cache)


def test_parquet_wrong_column_types(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"img": [b"x"], "label": ["cat"]}), path)
    with pytest.raises(InvalidInputError, match="`label` has type string"):
        load_arrays(str(path), cache_dir=cache)
    pq.write_table(pa.table({"img": [1], "label": [0]}), path)
    with pytest.raises(InvalidInputError, match="`img` has type int64"):
        load_arrays(str(path), cache_dir=cache)


def test_undecodable_image_names_the_row(tmp_path: Path, cache: Path) -> None:
    blobs = [_encode(im, "PNG") for im in _images(20, 0)]
    blobs[17] = b"\x89PNG\r\n\x1a\n garbage"
    path = write_parquet(tmp_path / "bad.parquet", blobs=blobs)
    with pytest.raises(InvalidInputError, match="row 17: cannot decode image"):
        load_arrays(str(path), cache_dir=cache)
    blobs[17] = b"GIF89a not a png"
    path = write_parquet(tmp_path / "gif.parquet", blobs=blobs)
    with pytest.raises(InvalidInputError, match="row 17: cannot decode image: not a PNG or JPEG"):
        load_arrays(str(path), cache_dir=cache)


def test_truncated_jpeg_names_the_row(tmp_path: Path, cache: Path) -> None:
    blobs = [_encode(im, "JPEG") for im in _images(5, 0)]
    blobs[2] = blobs[2][: len(blobs[2]) // 2]
    path = write_parquet(tmp_path / "trunc.parquet", blobs=blobs)
    with pytest.raises(InvalidInputError, match="row 2: cannot decode image"):
        load_arrays(str(path), cache_dir=cache)


def test_wrong_image_size_names_the_row(tmp_path: Path, cache: Path) -> None:
    blobs = [_encode(im, "PNG") for im in _images(5, 0)]
    blobs[3] = _encode(np.zeros((28, 28, 3), np.uint8), "PNG")
    path = write_parquet(tmp_path / "size.parquet", blobs=blobs)
    with pytest.raises(InvalidInputError, match="row 3: image is 28x28, expected 32x32"):
        load_arrays(str(path), cache_dir=cache)


def test_null_image_and_label(tmp_path: Path, cache: Path) -> None:
    blobs = [_encode(im, "PNG") for im in _images(3, 0)]
    path = write_parquet(tmp_path / "n.parquet", blobs=[blobs[0], None, blobs[2]])
    with pytest.raises(InvalidInputError, match="row 1: image bytes are missing"):
        load_arrays(str(path), cache_dir=cache)
    table = pq.read_table(write_parquet(tmp_path / "l.parquet", blobs=blobs))
    table = table.set_column(1, "label", pa.array([0, None, 2], pa.int64()))
    pq.write_table(table, tmp_path / "l.parquet")
    with pytest.raises(InvalidInputError, match="row 1: label is missing"):
        load_arrays(str(tmp_path / "l.parquet"), cache_dir=cache)


def test_labels_out_of_range(tmp_path: Path, cache: Path) -> None:
    path = write_parquet(tmp_path / "l.parquet", _images(4, 0), labels=np.array([0, 9, 10, 1]))
    with pytest.raises(InvalidInputError, match=r"row 2: label 10 is outside 0\.\.9"):
        load_arrays(str(path), cache_dir=cache)
    neg = write_parquet(tmp_path / "n.parquet", _images(2, 0), labels=np.array([-1, 1]))
    with pytest.raises(InvalidInputError, match="label -1 is outside"):
        load_arrays(str(neg), cache_dir=cache)


def test_batch_labels_out_of_range(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path)
    images = _images(BATCH_ROWS, 0)
    bad = _batch(images, np.full(BATCH_ROWS, 11), "bad")
    (src["folder"] / "data_batch_4").write_bytes(_Py2Pickler().dumps(bad))
    with pytest.raises(InvalidInputError, match=r"label 11 is outside 0..9"):
        load_arrays(str(src["folder"]), cache_dir=cache)


def test_empty_parquet(tmp_path: Path, cache: Path) -> None:
    path = write_parquet(tmp_path / "e.parquet", blobs=[], labels=np.array([], np.int64))
    with pytest.raises(InvalidInputError, match="holds no rows"):
        load_arrays(str(path), cache_dir=cache)


def test_empty_batches(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path, rows=0)
    with pytest.raises(InvalidInputError, match="hold no images"):
        load_arrays(str(src["folder"]), cache_dir=cache)


def test_missing_batch_files(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path / "a", skip=("data_batch_3", "batches.meta"))
    with pytest.raises(InvalidInputError, match=r"missing batch file.*data_batch_3, batches.meta"):
        load_arrays(str(src["folder"]), cache_dir=cache)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="cifar-10-python layout"):
        load_arrays(str(empty), cache_dir=cache)
    tarball = write_tarball(src["folder"], tmp_path / "partial.tar.gz")
    with pytest.raises(InvalidInputError, match=r"archive lacks batch file.*data_batch_3"):
        load_arrays(str(tarball), cache_dir=cache)


def test_corrupt_tarball(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 definitely not gzip")
    with pytest.raises(InvalidInputError, match=r"not a readable .tar.gz"):
        load_arrays(str(path), cache_dir=cache)


def test_malformed_batch(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path)
    batch = src["folder"] / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:-200])
    with pytest.raises(InvalidInputError, match="data_batch_2 is not a valid pickle"):
        load_arrays(str(src["folder"]), cache_dir=cache)
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(InvalidInputError, match=r"data_batch_2: b'data' has shape \(2, 100\)"):
        load_arrays(str(src["folder"]), cache_dir=cache)


def test_batch_with_a_code_payload_is_refused(tmp_path: Path, cache: Path) -> None:
    sentinel = tmp_path / "SENTINEL"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {sentinel}",))

    src = write_cifar_folder(tmp_path / "src")
    images = _images(BATCH_ROWS, 0)
    evil = _batch(images, _labels(BATCH_ROWS, 0), "evil") | {b"batch_label": Payload()}
    (src["folder"] / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(InvalidInputError, match=r"refuses to load global posix.system"):
        load_arrays(str(src["folder"]), cache_dir=cache)
    assert not sentinel.exists()


def test_wrong_number_of_class_names(tmp_path: Path, cache: Path) -> None:
    path = write_parquet(tmp_path / "m.parquet", _images(2, 0), metadata={"classes": "a,b,c"})
    with pytest.raises(InvalidInputError, match="3 class names"):
        load_arrays(str(path), cache_dir=cache)


# -------------------------------------------------------------------------- caps


def _refuse_parsing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The batch `name` reaching the unpickler fails the test: the cap must come first."""
    real = cifar_module.restricted_loads

    def loads(raw: bytes, what: str) -> object:
        assert not what.endswith(name), f"read {what}"
        return real(raw, what)

    monkeypatch.setattr(cifar_module, "restricted_loads", loads)


def test_batch_files_over_the_cap_are_refused_unread(
    cifar: dict, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = write_tarball(cifar["folder"], tmp_path / "cifar-10-python.tar.gz")
    size = (cifar["folder"] / "data_batch_1").stat().st_size
    monkeypatch.setattr(cifar_module, "MAX_MEMBER_BYTES", size - 1)
    _refuse_parsing(monkeypatch, "data_batch_1")
    member = f"member cifar-10-batches-py/data_batch_1 is {size} bytes, more than the limit"
    with pytest.raises(InvalidInputError, match=member):
        load_arrays(str(tarball), cache_dir=cache)
    with pytest.raises(InvalidInputError, match=f"data_batch_1 is {size} bytes, more than"):
        load_arrays(str(cifar["folder"]), cache_dir=cache)


def test_archive_headers_over_the_cap_are_refused(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pax header (a long name) that tarfile would read whole before naming the member.
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/" + "x" * 5000)
        tar.addfile(info, io.BytesIO())
    monkeypatch.setattr(cifar_module, "MAX_MEMBER_BYTES", 4096)
    claims = r"an archive header claims \d+ bytes, more than the limit of 4096"
    with pytest.raises(InvalidInputError, match=claims):
        load_arrays(str(path), cache_dir=cache)


def test_class_names_are_checked_before_they_are_decoded(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path)
    long_names = [b"n" * 300] * 10
    (src["folder"] / "batches.meta").write_bytes(pickle.dumps({b"label_names": long_names}))
    with pytest.raises(InvalidInputError, match="a class name is longer than 256 bytes"):
        load_arrays(str(src["folder"]), cache_dir=cache)
    (src["folder"] / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"\xff"] * 10}))
    with pytest.raises(InvalidInputError, match="a class name is not UTF-8"):
        load_arrays(str(src["folder"]), cache_dir=cache)


def test_parquet_rows_are_capped_from_the_footer(
    png_parquet: dict, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet, "ROWS_FLOOR", 59)
    monkeypatch.setattr(parquet, "MIN_ROW_BYTES", 2**40)
    monkeypatch.setattr(parquet, "page_sizes", lambda *a: pytest.fail("read the pages"))
    with pytest.raises(InvalidInputError, match="declares 60 rows, more than the limit of 59"):
        load_arrays(str(png_parquet["path"]), cache_dir=cache)


def test_parquet_image_bytes_are_capped_before_decoding(
    png_parquet: dict, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = png_parquet["path"].stat().st_size
    monkeypatch.setattr(parquet, "decode_images", lambda *a: pytest.fail("decoded"))
    monkeypatch.setattr(parquet, "ENCODED_BYTES_FLOOR", 0)
    monkeypatch.setattr(parquet, "ENCODED_BYTES_PER_FILE_BYTE", 0.5)
    with pytest.raises(InvalidInputError, match=f"more than the limit of {size // 2}"):
        load_arrays(str(png_parquet["path"]), cache_dir=cache)
    # Each image: from the dictionary page where the file has one, else row by row.
    monkeypatch.setattr(parquet, "ENCODED_BYTES_FLOOR", 2**40)
    monkeypatch.setattr(parquet, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(InvalidInputError, match="its dictionary holds an image of"):
        load_arrays(str(png_parquet["path"]), cache_dir=cache)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(png_parquet["path"]), plain, use_dictionary=False)
    with pytest.raises(InvalidInputError, match=r"row 0: the image is \d+ bytes, more than"):
        load_arrays(str(plain), cache_dir=cache)


# ---------------------------------------------------------------------- slow paths


@pytest.mark.slow
def test_decode_pool_matches_serial_and_reports_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decode, "_PARALLEL_DECODE_MIN_ROWS", 8)
    monkeypatch.setattr(decode.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    blobs = [_encode(im, "PNG") for im in _images(40, 5)]
    assert decode._decode_workers(len(blobs)) == 2
    np.testing.assert_array_equal(decode.decode_images(blobs), decode._decode_chunk(0, blobs))
    blobs[33] = b"broken"
    with pytest.raises(InvalidInputError, match="row 33: cannot decode image"):
        decode.decode_images(blobs)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_PARQUET.exists(), reason="shared dataset not present")
def test_shared_jpeg_parquet(tmp_path: Path) -> None:
    first = load_dataset(str(SHARED_PARQUET), cache_dir=tmp_path)
    assert len(first.train) + len(first.val) == 50_000
    assert len(first.val) == 5000 and first.test is None
    assert first.classes == CLASSES
    full = np.concatenate([first.train.labels, first.val.labels])
    assert np.bincount(full, minlength=10).tolist() == [5000] * 10
    assert np.bincount(first.val.labels, minlength=10).tolist() == [500] * 10

    start = time.perf_counter()
    second = load_dataset(str(SHARED_PARQUET), cache_dir=tmp_path)
    cached_seconds = time.perf_counter() - start
    assert second.digest == first.digest
    assert second.train.digest == first.train.digest and second.val.digest == first.val.digest
    assert cached_seconds < 3, cached_seconds  # generous: shared CI machines vary
