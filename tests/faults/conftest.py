from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pytest
from s3_proxy import FaultProxy

from tasks.scoring import ScoredModel, result_prefix

if TYPE_CHECKING:
    import numpy as np


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A fresh state directory; MLflow's process-wide settings restored afterwards."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "CIFAR_OBJECT_STORE",
                 "CIFAR_ARTIFACT_ROOT", "CIFAR10_SOURCE", "CIFAR_COMPETITION_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "state"
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


# ------------------------------------------------------------------- S3 behind a proxy

INPUT_ROWS = 50
BUCKET = "preds"
REFERENCE_BUCKET = "reference"
DATA_FILES = ("predictions.csv", "predictions.parquet")


@dataclass(frozen=True)
class Scoring:
    """A registered model and a competition file, ready for `score` against S3."""

    s3: Any  # boto3 client straight to moto: sees what is stored, bypassing the proxy
    proxy: FaultProxy
    bucket: str  # an empty bucket for the tests' outputs
    model: ScoredModel
    input_path: Path
    ids: np.ndarray
    input_digest: str

    @property
    def result_key(self) -> str:
        """The result's key prefix inside an output store, with tta=False."""
        return result_prefix("", self.model, self.input_digest, tta=False)

    def prefix(self, root: str) -> str:
        """Where `score(output=s3://<bucket>/<root>, tta=False)` puts its objects."""
        return f"{root}/{self.result_key}"

    @staticmethod
    def manifest_of(result: dict) -> dict:
        """The stored manifest that `score`'s result reports: the result less where it
        is and whether it was reused, and less the URI it adds to each file's key."""
        where = ("manifest_uri", "store", "prefix", "reused")
        files = {name: {k: v for k, v in entry.items() if k != "uri"}
                 for name, entry in result["files"].items()}
        return {**{k: v for k, v in result.items() if k not in where}, "files": files}

    def stored(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """key -> bytes of every object under `prefix`, read from moto directly."""
        listing = self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"]: self.s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                for o in listing}


@pytest.fixture(scope="module")
def module_proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_endpoint)
    yield proxy
    proxy.close()


@pytest.fixture
def proxy(module_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The module's fault proxy, passing everything through, with fresh counts."""
    module_proxy.reset()
    module_proxy.clear()
    yield module_proxy
    module_proxy.reset()


@pytest.fixture(scope="module")
def scoring(tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str,
            module_proxy: FaultProxy, pipeline_env: pytest.MonkeyPatch) -> Scoring:
    """An untrained `light` network registered in a SQLite MLflow store (scoring needs
    only a version with weights and tags), 50 images in the competition format on local
    disk, and S3 (through the proxy) as the endpoint of every s3:// output."""
    import boto3
    import numpy as np
    import torch

    from model.data import read_competition_pickle, write_competition_pickle
    from model.nets import build_model
    from tasks import registry
    from tasks.settings import Settings

    pipeline_env.setenv("AWS_ENDPOINT_URL_S3", module_proxy.url)
    Settings.from_env().apply()
    torch.manual_seed(0)
    with mlflow.start_run():
        mv = registry.register(
            build_model("light"), variant="light",
            tags={"val_acc": "0.5", "data_digest": "x", "val_digest": "y", "recipe": "fast"},
            tta=False)
    registry.set_alias(registry.CHAMPION, mv.version)

    rng = np.random.default_rng(0)
    ids = np.arange(INPUT_ROWS, dtype=np.int64)
    images = rng.integers(0, 256, (INPUT_ROWS, 32, 32, 3), dtype=np.uint8)
    input_path = tmp_path_factory.mktemp("input") / "competition.pkl"
    write_competition_pickle(input_path, ids, images)
    ids, images = read_competition_pickle(input_path)
    digest = hashlib.sha256()
    digest.update(ids.tobytes())
    digest.update(images.tobytes())

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    for bucket in (BUCKET, REFERENCE_BUCKET):
        s3.create_bucket(Bucket=bucket)
    model = ScoredModel(mv.name, str(mv.version), mv.run_id, mv.tags["weights_sha256"], "x")
    return Scoring(s3, module_proxy, BUCKET, model, input_path, ids, digest.hexdigest())


@dataclass(frozen=True)
class Reference:
    """A single scoring of the input, with no faults: what every other run must match."""

    result: dict
    manifest: dict
    data: dict[str, bytes]  # file name -> bytes

    def assert_matched_by(self, scoring: Scoring, bucket: str, prefix: str) -> dict:
        """Check that `prefix` holds exactly one complete result, byte for byte the
        reference's data, described by its manifest; return that manifest."""
        stored = scoring.stored(bucket, f"{prefix}/")
        names = {key.rsplit("/", 1)[-1]: key for key in stored}
        assert sorted(names) == sorted([*DATA_FILES, "manifest.json"]), sorted(stored)
        manifest = json.loads(stored[names["manifest.json"]])
        for name in DATA_FILES:
            body = stored[names[name]]
            assert body == self.data[name], f"{name} differs from a single run's"
            entry = manifest["files"][name]
            # Keys relative to the output store, not URIs: the store can move.
            assert entry["key"] == f"{scoring.result_key}/{name}"
            assert names[name] == f"{prefix}/{name}"
            assert entry["bytes"] == len(body)
            assert entry["sha256"] == hashlib.sha256(body).hexdigest()
            head = scoring.s3.head_object(Bucket=bucket, Key=names[name], ChecksumMode="ENABLED")
            assert base64.b64decode(head["ChecksumSHA256"]).hex() == entry["sha256"]
        # The same result as the reference, apart from where and when it was made.
        volatile = ("files", "predict_seconds", "created_at")
        assert ({k: v for k, v in manifest.items() if k not in volatile}
                == {k: v for k, v in self.manifest.items() if k not in volatile})
        assert manifest["rows"] == len(scoring.ids)
        csv = stored[names["predictions.csv"]].decode().splitlines()
        assert csv[0] == "ID,Labels"
        assert [int(line.split(",")[0]) for line in csv[1:]] == scoring.ids.tolist()
        return manifest


@pytest.fixture(scope="module")
def reference(scoring: Scoring, prefect_harness: None) -> Reference:
    from flows.score import ScoreConfig, score

    scoring.proxy.reset()
    result = score(ScoreConfig(input_uri=str(scoring.input_path),
                               output=f"s3://{REFERENCE_BUCKET}/single", tta=False))
    prefix = scoring.prefix("single")
    stored = scoring.stored(REFERENCE_BUCKET, f"{prefix}/")
    assert sorted(stored) == sorted(f"{prefix}/{n}" for n in (*DATA_FILES, "manifest.json"))
    manifest = json.loads(stored.pop(f"{prefix}/manifest.json"))
    return Reference(result, manifest, {k.rsplit("/", 1)[-1]: v for k, v in stored.items()})
