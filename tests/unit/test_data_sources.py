"""model.data's sources: the cifar-10-python folder and .tar.gz, Parquet, torchvision's
download, and file:// URIs, each read from files written in its real format."""

from __future__ import annotations

import io
import json
import pickle
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data import (
    CLASSES,
    InvalidInputError,
    content_digest,
    load_arrays,
    load_dataset,
    open_uri,
    read_bytes,
)
from tests.unit.data_files import (
    BATCH_ROWS,
    encode_image,
    random_images,
    write_cifar_folder,
    write_parquet,
    write_tarball,
)

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
    images = random_images(20, 3)
    blobs = [encode_image(im, "JPEG") for im in images]
    path = write_parquet(tmp_path / "jpeg.parquet", blobs=blobs)
    raw = load_arrays(str(path), cache_dir=cache)
    expected = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
    np.testing.assert_array_equal(raw.train_images, expected)


def test_parquet_converts_other_modes_to_rgb(tmp_path: Path, cache: Path) -> None:
    gray = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    rgba = np.dstack([random_images(1, 0)[0], np.full((32, 32), 7, np.uint8)])
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
    path = write_parquet(tmp_path / "m.parquet", random_images(10, 0), metadata=metadata)
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
