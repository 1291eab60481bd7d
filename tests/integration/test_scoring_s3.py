"""The scoring flow against moto's S3 server over real HTTP: the input is read from S3 with
pyarrow, the predictions are written with boto3, and this file checks them with a boto3
client of its own.

An untrained `light` network is registered (scoring only needs a version with weights and
tags) in a SQLite MLflow store under a temp directory. Every HTTP request the pipeline's
S3 clients send is recorded, so the tests can say which objects were written, in which
order, and that a rerun writes none.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flows.score import ScoreConfig, score
from model.data import CLASSES, InvalidInputError, read_competition_pickle
from model.nets import build_model
from tasks import registry
from tasks.registry import RegistryError
from tasks.settings import REGISTERED_MODEL, Settings
from tasks.storage import S3Store, StorageError

pytestmark = pytest.mark.integration

INPUT_URI = "s3://inputs/sample.pkl"
OUTPUT_URI = "s3://preds/run1"
# One forward pass per image: on two CPU cores, mirror-image TTA doubles a ~25 s prediction.
TTA = False
DATA_FILES = ("predictions.csv", "predictions.parquet")
WRITES = {"PUT", "POST", "DELETE"}


@dataclass(frozen=True)
class Request:
    operation: str  # e.g. PutObject
    method: str
    bucket: str
    key: str


@dataclass
class Recorder:
    """Every request sent by an S3Store's boto3 client, in order."""

    requests: list[Request] = field(default_factory=list)

    def __call__(self, request: Any, event_name: str = "", **kwargs: Any) -> None:
        path = unquote(urlsplit(request.url).path).lstrip("/")
        bucket, _, key = path.partition("/")
        self.requests.append(Request(event_name.rsplit(".", 1)[-1], request.method, bucket, key))

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method in WRITES]


@dataclass(frozen=True)
class Scoring:
    s3: Any  # a boto3 client of the test's own, not recorded
    version: str
    run_id: str
    weights_sha256: str
    ids: np.ndarray
    images: np.ndarray
    input_digest: str
    recorder: Recorder


def s3_location(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    assert parts.scheme == "s3", uri
    return parts.netloc, parts.path.lstrip("/")


def snapshot(s3: Any, bucket: str) -> dict[str, tuple[str, Any]]:
    """key -> (ETag, LastModified) of every object in the bucket."""
    contents = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in contents}


def scoring_runs() -> int:
    return len(mlflow.search_runs(search_all_experiments=True,
                                  filter_string="tags.kind = 'scoring'"))


@pytest.fixture(scope="module")
def scoring(
    pipeline_env: pytest.MonkeyPatch, moto_endpoint: str, competition_sample: Path
) -> Scoring:
    mp = pipeline_env
    mp.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    Settings.from_env().apply()

    torch.manual_seed(0)
    with mlflow.start_run() as run:
        mv = registry.register(
            build_model("light"), variant="light",
            tags={"val_acc": "0.5", "data_digest": "x", "val_digest": "y", "recipe": "fast"},
            tta=False,
        )
    registry.set_alias(registry.CHAMPION, mv.version)

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    for bucket in ("inputs", "preds"):
        s3.create_bucket(Bucket=bucket)
    bucket, key = s3_location(INPUT_URI)
    s3.upload_file(str(competition_sample), bucket, key)

    recorder = Recorder()
    make_client = S3Store._make_client

    def recorded_client(self: S3Store) -> Any:
        client = make_client(self)
        client.meta.events.register("before-send.s3", recorder)
        return client

    mp.setattr(S3Store, "_make_client", recorded_client)

    ids, images = read_competition_pickle(competition_sample)
    digest = hashlib.sha256()
    digest.update(ids.tobytes())
    digest.update(images.tobytes())
    return Scoring(s3, str(mv.version), run.info.run_id, mv.tags["weights_sha256"], ids, images,
                   digest.hexdigest(), recorder)


@pytest.fixture(scope="module")
def first_run(scoring: Scoring, prefect_harness: None) -> tuple[dict, list[Request]]:
    """The first scoring of the sample: the flow's result and the requests it sent."""
    scoring.recorder.requests.clear()
    result = score(ScoreConfig(input_uri=INPUT_URI, output=OUTPUT_URI, tta=TTA))
    return result, list(scoring.recorder.requests)


def get_object(s3: Any, uri: str) -> bytes:
    bucket, key = s3_location(uri)
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


# ---------------------------------------------------------------------------- tests


def test_writes_under_model_version_weights_run_and_input_digest(
    scoring: Scoring, first_run: tuple[dict, list[Request]]
) -> None:
    result, _ = first_run
    prefix = (f"{REGISTERED_MODEL}-v{scoring.version}/{scoring.input_digest[:16]}-"
              f"{scoring.weights_sha256[:12]}-{scoring.run_id[:8]}-no-tta")
    assert result["reused"] is False
    assert result["prefix"] == prefix
    assert result["manifest_uri"] == f"{OUTPUT_URI}/{prefix}/manifest.json"
    keys = sorted(snapshot(scoring.s3, "preds"))
    assert keys == sorted(f"run1/{prefix}/{name}" for name in (*DATA_FILES, "manifest.json"))

    # The flow also logged a scoring run to MLflow.
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.kind = 'scoring'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.rows"] == 1000
    assert runs.iloc[0]["params.output"] == result["manifest_uri"]


def test_csv_has_one_row_per_input_id_in_order(
    scoring: Scoring, first_run: tuple[dict, list[Request]]
) -> None:
    result, _ = first_run
    text = get_object(scoring.s3, result["files"]["predictions.csv"]["uri"]).decode()
    lines = text.splitlines()

    assert lines[0] == "ID,Labels"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == 1000 == len(scoring.ids)
    assert [int(i) for i, _ in rows] == scoring.ids.tolist()
    assert {int(label) for _, label in rows} <= set(range(10))


def test_parquet_schema_and_agreement_with_csv(
    scoring: Scoring, first_run: tuple[dict, list[Request]]
) -> None:
    result, _ = first_run
    table = pq.read_table(
        pa.BufferReader(get_object(scoring.s3, result["files"]["predictions.parquet"]["uri"])))
    expected = pa.schema(
        [("id", pa.int64()), ("label", pa.int64()), ("class_name", pa.string())]
        + [(f"prob_{name}", pa.float32()) for name in CLASSES]
    )
    assert len(CLASSES) == 10
    assert table.schema.equals(expected), table.schema

    assert table.num_rows == 1000
    assert table["id"].to_pylist() == scoring.ids.tolist()
    labels = np.asarray(table["label"].to_pylist())
    probs = np.stack([table[f"prob_{name}"].to_numpy() for name in CLASSES], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert (probs.argmax(axis=1) == labels).all()
    assert table["class_name"].to_pylist() == [CLASSES[i] for i in labels]
    csv = get_object(scoring.s3, result["files"]["predictions.csv"]["uri"]).decode()
    assert [int(line.split(",")[1]) for line in csv.splitlines()[1:]] == labels.tolist()


def test_manifest_describes_the_data_and_matches_its_checksums(
    scoring: Scoring, first_run: tuple[dict, list[Request]]
) -> None:
    result, _ = first_run
    manifest = json.loads(get_object(scoring.s3, result["manifest_uri"]))

    assert manifest["model_name"] == REGISTERED_MODEL
    assert manifest["model_version"] == scoring.version
    assert manifest["model_run_id"] == scoring.run_id
    assert manifest["weights_sha256"] == scoring.weights_sha256
    assert manifest["dataset_digest"] == "x"
    assert manifest["input_uri"] == INPUT_URI
    assert manifest["input_digest"] == scoring.input_digest
    assert manifest["rows"] == 1000
    assert manifest["tta"] is TTA
    assert sorted(manifest["files"]) == sorted(DATA_FILES)
    for name in DATA_FILES:
        entry = manifest["files"][name]
        assert entry["key"] == f"{result['prefix']}/{name}"  # relative to the output store
        uri = result["files"][name]["uri"]
        assert uri == f"{OUTPUT_URI}/{entry['key']}"
        body = get_object(scoring.s3, uri)
        assert entry["bytes"] == len(body)
        assert entry["sha256"] == hashlib.sha256(body).hexdigest()
        # The server holds the same SHA-256, sent by the client with the PUT.
        bucket, key = s3_location(uri)
        head = scoring.s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert base64.b64decode(head["ChecksumSHA256"]).hex() == entry["sha256"]


def test_manifest_is_written_last(
    scoring: Scoring, first_run: tuple[dict, list[Request]]
) -> None:
    result, requests = first_run
    writes = [r for r in requests if r.method in WRITES]
    prefix = f"run1/{result['prefix']}"

    # One PUT per object, data first, the manifest last, nothing else written.
    assert [(r.operation, r.bucket) for r in writes] == [("PutObject", "preds")] * 3
    assert [r.key for r in writes] == [f"{prefix}/{name}" for name in DATA_FILES] + [
        f"{prefix}/manifest.json"
    ]
    modified = {key.rsplit("/", 1)[-1]: when
                for key, (_, when) in snapshot(scoring.s3, "preds").items()}
    assert all(modified["manifest.json"] >= modified[name] for name in DATA_FILES)


def test_second_run_is_idempotent(
    scoring: Scoring, first_run: tuple[dict, list[Request]]
) -> None:
    result, _ = first_run
    before = snapshot(scoring.s3, "preds")
    runs_before = scoring_runs()
    scoring.recorder.requests.clear()

    again = score(ScoreConfig(input_uri=INPUT_URI, output=OUTPUT_URI, tta=TTA))

    assert again["reused"] is True
    assert again["manifest_uri"] == result["manifest_uri"]
    assert again["files"] == result["files"]
    assert again["created_at"] == result["created_at"]
    assert scoring.recorder.requests, "the rerun should have looked for the manifest"
    assert scoring.recorder.writes() == []
    assert snapshot(scoring.s3, "preds") == before  # same keys, ETags and times
    assert scoring_runs() == runs_before


class _Exploit:
    """Pickles to a call of os.system: loading it with plain pickle runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


def test_malicious_pickle_is_rejected_and_nothing_is_written(
    scoring: Scoring, prefect_harness: None, tmp_path: Path
) -> None:
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Exploit(f"touch {sentinel}"),
                            b"ids": np.arange(4, dtype=np.int64)}, protocol=4)
    scoring.s3.put_object(Bucket="inputs", Key="malicious.pkl", Body=payload)
    bucket = f"preds-{uuid.uuid4().hex[:8]}"
    scoring.s3.create_bucket(Bucket=bucket)
    runs_before = scoring_runs()
    scoring.recorder.requests.clear()

    with pytest.raises(InvalidInputError, match=r"malicious\.pkl: refuses to load global"):
        score(ScoreConfig(input_uri="s3://inputs/malicious.pkl", output=f"s3://{bucket}/out"))

    assert not sentinel.exists(), "the pickle's payload ran"
    assert scoring.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert scoring.recorder.writes() == []
    assert scoring_runs() == runs_before


def test_missing_alias_is_a_clear_error_and_nothing_is_written(
    scoring: Scoring, prefect_harness: None
) -> None:
    bucket = f"preds-{uuid.uuid4().hex[:8]}"
    scoring.s3.create_bucket(Bucket=bucket)
    scoring.recorder.requests.clear()

    with pytest.raises(RegistryError, match=r"no alias 'staging'.*'champion'"):
        score(ScoreConfig(model_uri=f"models:/{REGISTERED_MODEL}@staging",
                          input_uri=INPUT_URI, output=f"s3://{bucket}/out"))

    assert scoring.s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert scoring.recorder.writes() == []


@pytest.mark.parametrize("where", ["output URI", "CIFAR_OBJECT_STORE"])
def test_s3_endpoint_down_fails_cleanly_in_bounded_time(
    where: str,
    scoring: Scoring,
    prefect_harness: None,
    closed_endpoint: str,
    competition_sample: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The input comes from local disk, so the only thing that can fail is the store.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed_endpoint)
    if where == "output URI":
        config = ScoreConfig(input_uri=str(competition_sample), output="s3://preds/down")
    else:
        monkeypatch.setenv("CIFAR_OBJECT_STORE", "s3://preds/objects")
        config = ScoreConfig(input_uri=str(competition_sample), output="predictions")
    scoring.recorder.requests.clear()

    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        score(config)
    elapsed = time.monotonic() - start

    assert elapsed < 60
    assert f"cannot reach S3 endpoint {closed_endpoint}" in str(info.value)
    # It tried (with bounded retries) and wrote nothing anywhere.
    assert scoring.recorder.requests
    assert {r.operation for r in scoring.recorder.requests} == {"HeadObject"}
    assert len(scoring.recorder.requests) <= S3Store("b").max_attempts

