"""Decoded arrays shared through object storage: one machine decodes a source, the others
fetch the arrays instead of decoding it again, when they know the digest to expect; a bad
shared entry is never trusted (tests/faults/test_shared_cache_poisoning.py: forged ones)."""

from __future__ import annotations

import numpy as np
import pytest

import model.data.sources as sources
from model.config import DataConfig
from tasks.data import StoreCache
from tasks.storage import LocalStore
from tests.unit.data_files import write_parquet


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = sources._decode_source

    def counting(path, kind, source):
        seen.append(source)
        return real(path, kind, source)

    monkeypatch.setattr(sources, "_decode_source", counting)
    return seen


@pytest.fixture
def source(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    return str(write_parquet(tmp_path / "train.parquet", images))


def test_a_second_machine_fetches_what_the_first_decoded(tmp_path, source, decodes):
    shared = StoreCache(LocalStore(tmp_path / "objects"))
    config = DataConfig(data_source=source, val_size=20)
    first = config.load(cache_dir=tmp_path / "machine-a", shared_cache=shared)
    (entry,) = (tmp_path / "objects" / "cache" / "decoded").iterdir()
    shared.digest = first.digest  # a job, given the digest its parent decoded
    second = config.load(cache_dir=tmp_path / "machine-b", shared_cache=shared)
    assert decodes == [source]  # machine b decoded nothing
    assert second.digest == first.digest and entry.name.endswith(".npz")
    np.testing.assert_array_equal(second.train.images, first.train.images)


def test_a_corrupt_shared_entry_is_decoded_afresh(tmp_path, source, decodes):
    shared = StoreCache(LocalStore(tmp_path / "objects"))
    config = DataConfig(data_source=source, val_size=20)
    first = config.load(cache_dir=tmp_path / "machine-a", shared_cache=shared)
    (entry,) = (tmp_path / "objects" / "cache" / "decoded").iterdir()
    entry.write_bytes(entry.read_bytes()[:-300])  # torn or tampered in the store
    shared.digest = first.digest
    second = config.load(cache_dir=tmp_path / "machine-b", shared_cache=shared)
    assert decodes == [source, source]
    assert second.digest == first.digest


def test_a_compressed_shared_entry_is_refused_unread(tmp_path, source, decodes, monkeypatch):
    """A zip bomb in the shared cache: a member that inflates far beyond the file."""
    import zipfile

    import model.data.sources as sources_module

    store = LocalStore(tmp_path / "objects")
    shared = StoreCache(store)
    config = DataConfig(data_source=source, val_size=20)
    shared.digest = config.load(cache_dir=tmp_path / "machine-a", shared_cache=shared).digest
    (entry,) = (tmp_path / "objects" / "cache" / "decoded").iterdir()
    with zipfile.ZipFile(entry, "w", compression=zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("train_images.npy", b"\0" * (64 * 2**20))
    loaded = []
    real_load = np.load
    monkeypatch.setattr(sources_module.np, "load",
                        lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    config.load(cache_dir=tmp_path / "machine-b", shared_cache=shared)
    assert len(decodes) == 2 and loaded == []  # refused before np.load, then decoded
