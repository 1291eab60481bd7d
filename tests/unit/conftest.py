from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.data import Dataset, Split
from tests.unit.data_files import random_images, random_labels, write_cifar_folder, write_parquet


def make_dataset(n_train: int, n_val: int, seed: int = 0) -> Dataset:
    """Random images whose label is written into their brightness: learnable in a few steps."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        labels = np.arange(n, dtype=np.int64) % 10
        noise = rng.integers(0, 96, (n, 32, 32, 3))
        return Split((noise + labels[:, None, None, None] * 16).astype(np.uint8), labels)

    return Dataset(train=split(n_train), val=split(n_val), test=None,
                   classes=tuple(f"c{i}" for i in range(10)), digest="synthetic",
                   source="synthetic")


@pytest.fixture(scope="session")
def real_small(tmp_path_factory, shared_parquet: Path) -> Dataset:
    """256 training and 128 validation images of the shared JPEG copy of CIFAR-10."""
    from model.data import load_dataset

    cache = tmp_path_factory.mktemp("cache")
    return load_dataset(str(shared_parquet), val_size=128, train_size=256, cache_dir=cache)


@pytest.fixture
def tiny() -> Dataset:
    return make_dataset(64, 32)


# The data tests' source files, in each real format (tests/unit/data_files.py).


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A decode-cache directory of this test's own (pytest's `cache` is not used here)."""
    return tmp_path / "cache"


@pytest.fixture
def cifar(tmp_path: Path) -> dict:
    return write_cifar_folder(tmp_path / "src")


@pytest.fixture
def png_parquet(tmp_path: Path) -> dict:
    images, labels = random_images(60, 7), random_labels(60, 8)
    path = write_parquet(tmp_path / "train.parquet", images, labels, "PNG")
    return {"path": path, "images": images, "labels": labels}
