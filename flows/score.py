"""The scoring flow: a registered model predicts the competition file; the predictions go
to object storage.

Outputs live under `<output>/<model>-v<version>/<input digest>/`:
`predictions.csv` (ID,Labels), `predictions.parquet` (id, label, class name, 10
probabilities), and `manifest.json`, written last, which names what the others are. A
manifest therefore means a complete result: rerunning the same model on the same input
finds it and writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from datetime import UTC, datetime

import mlflow
import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from model.data import CLASSES, read_competition_pickle
from model.predict import predict, resolve_device
from tasks import registry
from tasks.settings import Settings
from tasks.storage import ObjectExistsError, ObjectStore, StorageError, open_store
from tasks.tracking import tracked_run

MANIFEST = "manifest.json"


class ScoreConfig(BaseModel):
    """Parameters of the scoring flow; the Prefect UI renders them as its form."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_uri: str = Field("models:/cifar10-resnet@champion",
                           description="models:/NAME@ALIAS or models:/NAME/VERSION")
    input_uri: str | None = Field(
        None, description="competition pickle: path, file:// or s3:// URI; "
        "default $CIFAR_COMPETITION_FILE")
    output: str = Field("predictions", description="a key prefix in the object store, or a "
                        "full s3:// or file:// URI")
    batch_size: int = Field(1000, ge=1, le=65_536)
    tta: bool = Field(True, description="average each image with its mirror image")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")


@task(name="read-competition-file", cache_policy=NONE, persist_result=False)
def read_input(uri: str) -> tuple[np.ndarray, np.ndarray, str]:
    ids, images = read_competition_pickle(uri)
    digest = hashlib.sha256()
    digest.update(ids.tobytes())
    digest.update(images.tobytes())
    return ids, images, digest.hexdigest()


@task(name="write-predictions", cache_policy=NONE, persist_result=False,
      retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=lambda task, run, state: _transient(state))
def write_outputs(store: ObjectStore, prefix: str, files: dict[str, bytes],
                  manifest: dict) -> tuple[dict, bool]:
    """Data objects first, the manifest last, each only if absent: a reader that sees the
    manifest sees complete data; of two runs scoring the same model and input at once,
    the first writer of each key wins, and a late run cannot overwrite data that a stored
    manifest describes. Returns (the stored manifest, whether it is this run's).

    A data object already there is a complete copy of the same result (puts are atomic)
    from a concurrent run or an earlier try. Its bytes may differ from ours in the last
    bits of a probability (another device), so the manifest describes what is stored."""
    entries = dict(manifest["files"])
    for name, payload in files.items():
        key = f"{prefix}/{name}"
        try:
            store.put(key, payload, if_absent=True)
        except ObjectExistsError:
            stored = store.get(key)
            if stored != payload:
                entries[name] = {**entries[name], "bytes": len(stored),
                                 "sha256": hashlib.sha256(stored).hexdigest()}
    manifest = {**manifest, "files": entries}
    try:
        store.put(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=2).encode(),
                  content_type="application/json", if_absent=True)
    except ObjectExistsError:
        # Ours too when a retried put found its own first attempt stored.
        existing = json.loads(store.get(f"{prefix}/{MANIFEST}"))
        return existing, existing == manifest
    return manifest, True


@flow(name="score-competition", log_prints=True)
def score(config: ScoreConfig = ScoreConfig()) -> dict:  # noqa: B008 (a frozen default)
    logger = get_run_logger()
    settings = Settings.from_env()
    settings.apply()
    input_uri = competition_input(config.input_uri)
    ids, images, input_digest = read_input(input_uri)  # raises before anything is written
    mv = registry.resolve(config.model_uri)
    store, root = _output_store(config.output, settings)
    # Everything that changes the predictions is in the key: model, input and TTA.
    variant = "" if config.tta else "-notta"
    prefix = f"{root}{mv.name}-v{mv.version}/{input_digest[:16]}{variant}".lstrip("/")
    if store.exists(f"{prefix}/{MANIFEST}"):
        manifest = json.loads(store.get(f"{prefix}/{MANIFEST}"))
        logger.info("already scored: %s", store.uri(f"{prefix}/{MANIFEST}"))
        return {**manifest, "manifest_uri": store.uri(f"{prefix}/{MANIFEST}"),
                "store": store.uri_prefix, "prefix": prefix, "reused": True}

    started = time.perf_counter()
    device = resolve_device(config.device)
    loaded = registry.load(config.model_uri, device=device)
    labels, probs = predict(loaded.network, images, batch_size=config.batch_size,
                            tta=config.tta, device=device)
    seconds = time.perf_counter() - started
    files = {"predictions.csv": _csv(ids, labels),
             "predictions.parquet": _parquet(ids, labels, probs)}
    manifest = {
        "model_name": loaded.name,
        "model_version": loaded.version,
        "model_run_id": loaded.run_id,
        "model_uri": config.model_uri,
        "weights_sha256": loaded.weights_sha256,
        "dataset_digest": loaded.tags.get("data_digest"),
        "input_uri": input_uri,
        "input_digest": input_digest,
        "rows": len(ids),
        "tta": config.tta,
        "files": {name: {"uri": store.uri(f"{prefix}/{name}"), "bytes": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}
                  for name, payload in files.items()},
        "predict_seconds": seconds,
        "created_at": datetime.now(UTC).isoformat(),
    }
    manifest, written = write_outputs(store, prefix, files, manifest)
    manifest_uri = store.uri(f"{prefix}/{MANIFEST}")
    counts = np.bincount(labels, minlength=10)
    with tracked_run(run_name=f"score v{loaded.version} {input_digest[:8]}"):
        mlflow.set_tags({"kind": "scoring", "model_version": loaded.version})
        mlflow.log_params({"model_uri": config.model_uri, "model_version": loaded.version,
                           "input_uri": input_uri, "input_digest": input_digest,
                           "tta": config.tta, "output": manifest_uri})
        mlflow.log_metrics({"rows": len(ids), "seconds": seconds,
                            **{f"class_count/{CLASSES[i]}": int(c) for i, c in enumerate(counts)}})
    create_link_artifact(key="predictions", link=manifest["files"]["predictions.csv"]["uri"],
                         link_text=f"predictions of {loaded.name} v{loaded.version}",
                         description=f"{len(ids)} rows; manifest {manifest_uri}")
    if written:
        logger.info("wrote %d predictions: %s", len(ids), manifest_uri)
    else:
        logger.info("a concurrent run stored this result first; using it: %s", manifest_uri)
    return {**manifest, "manifest_uri": manifest_uri, "store": store.uri_prefix,
            "prefix": prefix, "reused": not written}


def _csv(ids: np.ndarray, labels: np.ndarray) -> bytes:
    out = io.StringIO()
    out.write("ID,Labels\n")
    for i, label in zip(ids.tolist(), labels.tolist(), strict=True):
        out.write(f"{i},{label}\n")
    return out.getvalue().encode()


def _parquet(ids: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> bytes:
    import pyarrow.parquet as pq

    columns = {"id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.int64()),
               "class_name": pa.array([CLASSES[i] for i in labels.tolist()], pa.string())}
    for i, name in enumerate(CLASSES):
        columns[f"prob_{name}"] = pa.array(probs[:, i], pa.float32())
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def _output_store(output: str, settings: Settings) -> tuple[ObjectStore, str]:
    """(store, key prefix): a full URI is its own store; else a prefix in the default."""
    if "://" in output:
        return open_store(output), ""
    return open_store(settings.object_store), output.strip("/") + "/"


def competition_input(configured: str | None) -> str:
    """The competition file: as configured, else CIFAR_COMPETITION_FILE."""
    import os

    value = configured or os.environ.get("CIFAR_COMPETITION_FILE")
    if not value:
        raise ValueError("no competition file: set input_uri in the flow's parameters or "
                         "CIFAR_COMPETITION_FILE")
    return value


def _transient(state) -> bool:
    try:
        state.result()
    except (ObjectExistsError, ValueError):
        return False
    except StorageError:
        return True
    except Exception:
        return False
    return False
