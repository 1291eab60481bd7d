"""The data task: resolve the source, load and split it, record it in MLflow."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from model.config import DataConfig
from model.data import Dataset, InvalidInputError
from tasks.retries import TRANSIENT_RETRIES
from tasks.settings import Settings
from tasks.storage import MissingObjectError, ObjectExistsError, ObjectStore, open_store

TORCHVISION = "torchvision"


def resolve_source(configured: str | None, settings: Settings) -> tuple[str, str]:
    """(source, where it came from): the flow config, then CIFAR10_SOURCE, then torchvision."""
    if configured:
        return configured, "the flow configuration"
    if settings.data_source:
        return settings.data_source, "CIFAR10_SOURCE"
    return TORCHVISION, "the default (torchvision's download)"


class DataMismatchError(InvalidInputError):
    """A job's data is not the data its parent run decoded (and validated on)."""


@task(name="load-data", cache_policy=NONE, persist_result=False, **TRANSIENT_RETRIES)
def load_data(settings: Settings, data: DataConfig, digest: str | None = None) -> Dataset:
    """Load and split the configured data; with `digest` (what the parent run decoded),
    data that decodes to another digest fails the job."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    resolved, origin = resolve_source(data.data_source, settings)
    logger.info("data source %s (from %s)", resolved, origin)
    try:
        dataset = data.load(resolved, cache_dir=settings.cache_dir,
                            shared_cache=StoreCache(open_store(settings.object_store), digest))
    except InvalidInputError as exc:
        if resolved == TORCHVISION:
            raise InvalidInputError(
                f"{exc}. No data source was configured: set CIFAR10_SOURCE or pass one "
                "(--data on the command line, data_source in the flow's parameters) to a "
                "cifar-10-python folder or .tar.gz, a Parquet file, or an s3:// URI"
            ) from exc
        raise
    if digest and dataset.digest != digest:
        raise DataMismatchError(
            f"the data differs from the parent run's: {resolved} ({origin}) decodes here to "
            f"digest {dataset.digest}, the parent decoded {data.data_source} to {digest}. "
            "Give every worker the same data (an s3:// URI, or the same file at that path)")
    logger.info(
        "dataset %s: %d training, %d validation%s images",
        dataset.digest[:12], len(dataset.train), len(dataset.val),
        f", {len(dataset.test)} test" if dataset.test is not None else "",
    )
    return dataset


class StoreCache:
    """Decoded arrays in object storage (`cache/decoded/`), so a worker fetches what another
    decoded instead of decoding the source again (model.data.SharedCache)."""

    PREFIX = "cache/decoded"

    def __init__(self, store: ObjectStore, digest: str | None = None):
        self.store, self.digest = store, digest

    def fetch(self, name: str, path: Path) -> bool:
        try:
            self.store.get_file(f"{self.PREFIX}/{name}", path)
        except MissingObjectError:
            return False
        return True

    def publish(self, name: str, path: Path) -> None:
        # ObjectExistsError: another machine published the same content first.
        with contextlib.suppress(ObjectExistsError):
            self.store.put_file(f"{self.PREFIX}/{name}", path, if_absent=True)


def log_dataset(data: Dataset) -> None:
    """Record the splits as inputs of the active MLflow run, named by their digests."""
    for context, split in (("training", data.train), ("validation", data.val)):
        with warnings.catch_warnings():
            # A local path matches two equivalent MLflow source types; either is right.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(
                split.images, targets=split.labels, source=source_uri(data.source),
                name=f"cifar10-{context}", digest=split.digest[:16],
            )
        mlflow.log_input(dataset, context=context, tags={"source_digest": data.digest})


def source_uri(source: str) -> str:
    """The source as a URI that names the same data from any working directory."""
    if "://" in source or source.startswith(TORCHVISION):
        return source
    return f"file://{os.path.abspath(source)}"
