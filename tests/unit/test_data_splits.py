"""model.data's digests and splits: content digests, the stratified validation hold-out and
the training subset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.data import (
    CLASSES,
    InvalidInputError,
    Split,
    content_digest,
    load_dataset,
    stratified_split,
)
from tests.unit.data_files import (
    BATCH_ROWS,
    random_images,
    random_labels,
)

# ------------------------------------------------------------------------- digest


def test_content_digest_is_stable_and_sensitive() -> None:
    images, labels = random_images(8, 0), random_labels(8, 0)
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
    labels = random_labels(1000, 0)
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
    labels = random_labels(50, 1)
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
