"""model.data's decode cache and decoding: a second load comes from the cache, a corrupt
or unwritable cache never fails a load, and the parallel decode matches the serial one."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from model.data import (
    CLASSES,
    InvalidInputError,
    decode,
    load_arrays,
    load_dataset,
    parquet,
    sources,
)
from tests.unit.data_files import (
    encode_image,
    random_images,
    write_cifar_folder,
)

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

# ---------------------------------------------------------------------- slow paths


@pytest.mark.slow
def test_decode_pool_matches_serial_and_reports_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decode, "_PARALLEL_DECODE_MIN_ROWS", 8)
    monkeypatch.setattr(decode.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    blobs = [encode_image(im, "PNG") for im in random_images(40, 5)]
    assert decode._decode_workers(len(blobs)) == 2
    np.testing.assert_array_equal(decode.decode_images(blobs), decode._decode_chunk(0, blobs))
    blobs[33] = b"broken"
    with pytest.raises(InvalidInputError, match="row 33: cannot decode image"):
        decode.decode_images(blobs)


@pytest.mark.slow
def test_shared_jpeg_parquet(tmp_path: Path, shared_parquet: Path) -> None:
    first = load_dataset(str(shared_parquet), cache_dir=tmp_path)
    assert len(first.train) + len(first.val) == 50_000
    assert len(first.val) == 5000 and first.test is None
    assert first.classes == CLASSES
    full = np.concatenate([first.train.labels, first.val.labels])
    assert np.bincount(full, minlength=10).tolist() == [5000] * 10
    assert np.bincount(first.val.labels, minlength=10).tolist() == [500] * 10

    start = time.perf_counter()
    second = load_dataset(str(shared_parquet), cache_dir=tmp_path)
    cached_seconds = time.perf_counter() - start
    assert second.digest == first.digest
    assert second.train.digest == first.train.digest and second.val.digest == first.val.digest
    assert cached_seconds < 3, cached_seconds  # generous: shared CI machines vary
