"""Decode, split and cache a dataset ahead of training, and record what it holds.

Run it on a worker before a sweep so that every job on that machine finds the decoded
arrays in its cache.
"""

from __future__ import annotations

from prefect import flow

from tasks.data import prepare_data
from tasks.settings import Settings


@flow(name="prepare-data", log_prints=True)
def prepare_data_flow(data_source: str | None = None, val_size: int = 5000,
                      split_seed: int = 0) -> dict:
    settings = Settings.from_env()
    data = prepare_data(settings, data_source, val_size, None, split_seed)
    counts = [int((data.train.labels == c).sum()) for c in range(len(data.classes))]
    return {"source": data.source, "digest": data.digest, "val_digest": data.val.digest,
            "train_images": len(data.train), "val_images": len(data.val),
            "test_images": len(data.test) if data.test is not None else 0,
            "train_per_class": dict(zip(data.classes, counts, strict=True))}
