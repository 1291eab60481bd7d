"""A shared decode cache entry forged by whoever can write to the bucket: the same images
with other labels, stored with their recomputed digest, so that the entry agrees with
itself. No load may train on it: a job checks an entry against the digest its parent decoded
from the source, and a load with nothing to check against decodes the source itself."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

import model.data.sources as sources
from model.config import DataConfig
from model.data import RawData
from tasks.data import StoreCache
from tasks.storage import LocalStore
from tests.unit.data_files import write_parquet


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = sources._decode_source
    monkeypatch.setattr(sources, "_decode_source",
                        lambda path, kind, source: seen.append(source) or real(path, kind, source))
    return seen


@pytest.fixture
def published(tmp_path):
    """(config, the data machine a decoded and published, the store, its one entry)."""
    images = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    config = DataConfig(data_source=str(write_parquet(tmp_path / "train.parquet", images)),
                        val_size=20)
    store = LocalStore(tmp_path / "objects")
    first = config.load(cache_dir=tmp_path / "machine-a", shared_cache=StoreCache(store))
    (entry,) = (tmp_path / "objects" / "cache" / "decoded").iterdir()
    return config, first, store, entry


def _forge(entry) -> None:
    """Every label moved to the next class; the digest recomputed to match."""
    raw = sources._read_cache(entry)
    assert raw is not None
    sources._write_cache(entry, RawData.of(raw.train_images, (raw.train_labels + 1) % 10,
                                           raw.test_images, raw.test_labels, raw.classes))


def _genuine(data, first) -> None:
    assert data.digest == first.digest
    np.testing.assert_array_equal(data.train.labels, first.train.labels)
    np.testing.assert_array_equal(data.val.labels, first.val.labels)


def test_a_forged_entry_is_refused_against_the_parents_digest(
        tmp_path, decodes, published, caplog):
    config, first, store, entry = published
    _forge(entry)
    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        data = config.load(cache_dir=tmp_path / "machine-b",
                           shared_cache=StoreCache(store, first.digest))
    _genuine(data, first)
    assert len(decodes) == 2  # machine b decoded the source afresh
    assert f"refusing the decode cache entry {entry.name}" in caplog.text
    assert first.digest in caplog.text
    # What machine b keeps in its own cache is the genuine data, not the forged copy.
    again = config.load(cache_dir=tmp_path / "machine-b",
                        shared_cache=StoreCache(store, first.digest))
    _genuine(again, first)
    assert len(decodes) == 2


def test_with_no_digest_to_check_against_a_shared_entry_is_not_used(
        tmp_path, decodes, published):
    """A parent, or prepare-data: nothing yet says what the source decodes to."""
    config, first, store, entry = published
    _forge(entry)
    data = config.load(cache_dir=tmp_path / "machine-b", shared_cache=StoreCache(store))
    _genuine(data, first)
    assert len(decodes) == 2


def test_a_forged_entry_already_in_the_local_cache_is_replaced(
        tmp_path, decodes, published, caplog):
    """Copied into a machine's own cache before entries were checked."""
    config, first, store, entry = published
    _forge(entry)
    (tmp_path / "machine-b").mkdir()
    shutil.copyfile(entry, tmp_path / "machine-b" / entry.name)
    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        data = config.load(cache_dir=tmp_path / "machine-b",
                           shared_cache=StoreCache(store, first.digest))
    _genuine(data, first)
    assert "refusing the decode cache entry" in caplog.text
    restored = sources._read_cache(tmp_path / "machine-b" / entry.name)
    assert restored is not None and restored.digest == first.digest
