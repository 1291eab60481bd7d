"""The scoring tasks: read the competition file, resolve the model, find a stored result or
predict, write the predictions with their manifest, and record the scoring in MLflow.

A result lives under `result_prefix`: the CSV, the Parquet and `manifest.json`, written
last. Version numbers repeat when a registry is reset, so the key names the model by its
weights' sha256 and run, and a stored manifest is reused only when it matches. Manifests
name their files by key, relative to the store, so a store can move.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import mlflow
import numpy as np
import pyarrow as pa
from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NONE

from model.config import ConfigError
from model.data import CLASSES, read_competition_pickle
from model.predict import resolve_device
from tasks import registry
from tasks.progress import predict_with_bar
from tasks.registry import RegistryError
from tasks.retries import TRANSIENT_RETRIES
from tasks.settings import Settings
from tasks.storage import ObjectExistsError, ObjectStore
from tasks.tracking import tracked_run

MANIFEST = "manifest.json"


class ResultMismatchError(ObjectExistsError):
    """A stored result at this scoring's key was made by another model or from another
    input: it is neither reported nor overwritten (and no retry can change that)."""


@dataclass(frozen=True)
class CompetitionInput:
    uri: str
    ids: np.ndarray  # (N,) int64
    images: np.ndarray  # (N, 32, 32, 3) uint8
    digest: str  # sha256 of ids and pixels


@dataclass(frozen=True)
class ScoredModel:
    """A registry version: `run_id` and `weights_sha256` identify it, the rest labels it."""

    name: str
    version: str
    run_id: str
    weights_sha256: str
    data_digest: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Predictions:
    labels: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, 10) float32
    seconds: float  # loading the weights and predicting


def competition_input(configured: str | None, settings: Settings) -> str:
    """The competition file: as configured, else CIFAR_COMPETITION_FILE."""
    value = configured or settings.competition_file
    if not value:
        raise ConfigError("no competition file: set input_uri in the flow's parameters or "
                         "CIFAR_COMPETITION_FILE")
    return value


def result_prefix(root: str, model: ScoredModel, input_digest: str, tta: bool) -> str:
    """The key of a result: everything that changes the predictions (input, weights, TTA)
    and the run that made the weights, so a model never finds another's result there."""
    views = "tta" if tta else "no-tta"
    leaf = f"{input_digest[:16]}-{model.weights_sha256[:12]}-{model.run_id[:8]}-{views}"
    return f"{root}{model.name}-v{model.version}/{leaf}"


def check_reusable(manifest: dict, model: ScoredModel, input_digest: str, tta: bool,
                   where: str) -> dict:
    """`manifest` if it describes this model's predictions of this input; otherwise
    ResultMismatchError, rather than pass another model's predictions off as these."""
    expected = {"model_run_id": model.run_id, "weights_sha256": model.weights_sha256,
                "input_digest": input_digest, "tta": tta}
    differs = {k: v for k, v in expected.items() if manifest.get(k) != v}
    if differs:
        stored = ", ".join(f"{k} {manifest.get(k)!r} (expected {v!r})" for k, v in differs.items())
        raise ResultMismatchError(
            f"the result stored at {where} is not {model.name} version {model.version}'s "
            f"predictions of this input: {stored}. Nothing was reused or overwritten; "
            "remove that result or score to another output")
    return manifest


@task(name="read-competition-file", cache_policy=NONE, persist_result=False)
def read_competition_file(uri: str) -> CompetitionInput:
    ids, images = read_competition_pickle(uri)
    digest = hashlib.sha256(ids.tobytes())
    digest.update(images.tobytes())
    return CompetitionInput(uri, ids, images, digest.hexdigest())


@task(name="resolve-model", cache_policy=NONE, persist_result=False)
def resolve_model(model_uri: str) -> ScoredModel:
    mv = registry.resolve(model_uri)
    weights = dict(mv.tags).get("weights_sha256")
    if not weights or not mv.run_id:
        raise RegistryError(
            f"{mv.name} version {mv.version} has no weights_sha256 tag or no run: it was not "
            "registered by this pipeline, so its predictions cannot be keyed; register it anew")
    return ScoredModel(mv.name, str(mv.version), mv.run_id, weights, mv.tags.get("data_digest"))


@task(name="find-stored-result", cache_policy=NONE, persist_result=False)
def find_stored_result(store: ObjectStore, prefix: str, model: ScoredModel, input_digest: str,
                       tta: bool) -> dict | None:
    """The manifest of this scoring's result if one is stored (checked), else None."""
    key = f"{prefix}/{MANIFEST}"
    if not store.exists(key):
        return None
    return check_reusable(json.loads(store.get(key)), model, input_digest, tta, store.uri(key))


@task(name="predict-images", cache_policy=NONE, persist_result=False)
def predict_images(model: ScoredModel, images: np.ndarray, *, batch_size: int, tta: bool,
                   device: str) -> Predictions:
    started = time.perf_counter()
    torch_device = resolve_device(device)
    loaded = registry.load(model.uri, device=torch_device)
    if (loaded.run_id, loaded.weights_sha256) != (model.run_id, model.weights_sha256):
        raise RegistryError(
            f"{model.uri} changed while it was being scored (run {loaded.run_id}, weights "
            f"{loaded.weights_sha256[:12]} instead of run {model.run_id}, weights "
            f"{model.weights_sha256[:12]}): was the registry reset? Score again")
    labels, probabilities = predict_with_bar(loaded.network, images, "scoring", tta=tta,
                                             batch_size=batch_size, device=torch_device)
    return Predictions(labels, probabilities, time.perf_counter() - started)


def encode_predictions(ids: np.ndarray, predictions: Predictions) -> dict[str, bytes]:
    """File name -> bytes: the competition's CSV and the Parquet with probabilities."""
    import pyarrow.parquet as pq

    labels = predictions.labels
    csv = "ID,Labels\n" + "".join(
        f"{i},{label}\n" for i, label in zip(ids.tolist(), labels.tolist(), strict=True))
    columns = {"id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.int64()),
               "class_name": pa.array([CLASSES[i] for i in labels.tolist()], pa.string())}
    for i, name in enumerate(CLASSES):
        columns[f"prob_{name}"] = pa.array(predictions.probabilities[:, i], pa.float32())
    parquet = io.BytesIO()
    pq.write_table(pa.table(columns), parquet)
    return {"predictions.csv": csv.encode(), "predictions.parquet": parquet.getvalue()}


def describe_result(prefix: str, files: dict[str, bytes], model: ScoredModel, model_uri: str,
                    scoring_input: CompetitionInput, tta: bool, seconds: float) -> dict:
    """The manifest: what made the files, from what, and their keys and checksums."""
    return {
        "model_name": model.name, "model_version": model.version, "model_run_id": model.run_id,
        "model_uri": model_uri, "weights_sha256": model.weights_sha256,
        "dataset_digest": model.data_digest, "input_uri": scoring_input.uri,
        "input_digest": scoring_input.digest, "rows": len(scoring_input.ids), "tta": tta,
        "files": {name: {"key": f"{prefix}/{name}", "bytes": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}
                  for name, payload in files.items()},
        "predict_seconds": seconds, "created_at": datetime.now(UTC).isoformat()}


@task(name="write-predictions", cache_policy=NONE, persist_result=False, **TRANSIENT_RETRIES)
def write_predictions(store: ObjectStore, prefix: str, files: dict[str, bytes], manifest: dict,
                      model: ScoredModel) -> tuple[dict, bool]:
    """Data objects first, the manifest last, each only if absent: a reader that sees the
    manifest sees complete data, and the first writer of each key wins. Returns (the
    stored manifest, whether it is this run's).

    A data object already there may differ from ours in the last bits of a probability
    (another device), so the manifest describes what is stored."""
    entries = dict(manifest["files"])
    for name, payload in files.items():
        try:
            store.put(entries[name]["key"], payload, if_absent=True)
        except ObjectExistsError:
            stored = store.get(entries[name]["key"])
            if stored != payload:
                entries[name] = {**entries[name], "bytes": len(stored),
                                 "sha256": hashlib.sha256(stored).hexdigest()}
    manifest = {**manifest, "files": entries}
    key = f"{prefix}/{MANIFEST}"
    try:
        store.put(key, json.dumps(manifest, indent=2).encode(), content_type="application/json",
                  if_absent=True)
    except ObjectExistsError:
        # Ours too when a retried put found its own first attempt stored.
        existing = check_reusable(json.loads(store.get(key)), model, manifest["input_digest"],
                                  manifest["tta"], store.uri(key))
        return existing, existing == manifest
    return manifest, True


@task(name="log-scoring", cache_policy=NONE, persist_result=False)
def log_scoring(result: dict, predictions: Predictions) -> None:
    """A scoring run in MLflow and a link to the predictions in Prefect."""
    counts = np.bincount(predictions.labels, minlength=len(CLASSES))
    version, digest = result["model_version"], result["input_digest"]
    with tracked_run(run_name=f"score v{version} {digest[:8]}"):
        mlflow.set_tags({"kind": "scoring", "model_version": version})
        mlflow.log_params({"model_uri": result["model_uri"], "model_version": version,
                           "model_run_id": result["model_run_id"],
                           "weights_sha256": result["weights_sha256"],
                           "input_uri": result["input_uri"], "input_digest": digest,
                           "tta": result["tta"], "output": result["manifest_uri"]})
        mlflow.log_metrics({"rows": result["rows"], "seconds": predictions.seconds,
                            **{f"class_count/{CLASSES[i]}": int(c) for i, c in enumerate(counts)}})
    create_link_artifact(key="predictions", link=result["files"]["predictions.csv"]["uri"],
                         link_text=f"predictions of {result['model_name']} v{version}",
                         description=f"{result['rows']} rows; manifest {result['manifest_uri']}")


def scoring_result(store: ObjectStore, prefix: str, manifest: dict, *, reused: bool) -> dict:
    """What the flow returns: the manifest plus URIs, and whether it was already there."""
    files = {name: {**entry, "uri": store.uri(entry["key"])}
             for name, entry in manifest["files"].items()}
    return {**manifest, "files": files, "manifest_uri": store.uri(f"{prefix}/{MANIFEST}"),
            "store": store.uri_prefix, "prefix": prefix, "reused": reused}
