from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.data import Dataset, Split

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
SHARED_PARQUET = SHARED / "cifar10-jpeg" / "train.parquet"


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
def real_small(tmp_path_factory) -> Dataset:
    """256 training and 128 validation images of the shared JPEG copy of CIFAR-10."""
    if not SHARED_PARQUET.exists():
        pytest.fail(f"the shared dataset is missing: {SHARED_PARQUET}")
    from model.data import load_dataset

    cache = tmp_path_factory.mktemp("cache")
    return load_dataset(str(SHARED_PARQUET), val_size=128, train_size=256, cache_dir=cache)


@pytest.fixture
def tiny() -> Dataset:
    return make_dataset(64, 32)
