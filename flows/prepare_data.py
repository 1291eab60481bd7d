"""Decode, split and cache a dataset ahead of training (on a worker before a sweep, so its
jobs find the decoded arrays), and record what it holds."""

from __future__ import annotations

from prefect import flow

from model.config import DataConfig
from tasks.data import load_data
from tasks.settings import Settings


@flow(name="prepare-data", log_prints=True)
def prepare_data_flow(data: DataConfig = DataConfig()) -> dict:  # noqa: B008 (frozen)
    settings = Settings.from_env()
    dataset = load_data(settings, data)
    counts = [int((dataset.train.labels == c).sum()) for c in range(len(dataset.classes))]
    return {"source": dataset.source, "digest": dataset.digest,
            "val_digest": dataset.val.digest, "train_images": len(dataset.train),
            "val_images": len(dataset.val),
            "test_images": len(dataset.test) if dataset.test is not None else 0,
            "train_per_class": dict(zip(dataset.classes, counts, strict=True))}
