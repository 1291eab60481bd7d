from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pytest
from s3_proxy import FaultProxy

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "datasets"


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

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# What tasks.settings.Settings reads, and what mlflow writes back into os.environ.
PIPELINE_ENV = ["CIFAR_STATE_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "CIFAR_ARTIFACT_ROOT",
                "CIFAR_OBJECT_STORE", "CIFAR10_SOURCE", "CIFAR10_CACHE_DIR",
                "CIFAR_COMPETITION_FILE", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]
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
    model_name: str
    version: str
    input_path: Path
    ids: np.ndarray
    input_digest: str

    def prefix(self, root: str) -> str:
        """Where `score(output=s3://<bucket>/<root>, tta=False)` puts its objects."""
        return f"{root}/{self.model_name}-v{self.version}/{self.input_digest[:16]}-notta"

    def stored(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """key -> bytes of every object under `prefix`, read from moto directly."""
        listing = self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"]: self.s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                for o in listing}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server over real HTTP, in its own process group, for one test module."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto exited with {proc.returncode}: {log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto did not start in 30 s: {log_path.read_text()[-4000:]}")
                time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def module_proxy(moto_url: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_url)
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
def scoring(tmp_path_factory: pytest.TempPathFactory, moto_url: str,
            module_proxy: FaultProxy) -> Iterator[Scoring]:
    """An untrained `light` network registered in a SQLite MLflow store (scoring needs
    only a version with weights and tags), 50 images in the competition format on local
    disk, and S3 (through the proxy) as the endpoint of every s3:// output. MLflow's
    process-global tracking URI and experiment are restored at the end."""
    import boto3
    import numpy as np
    import torch
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from model.data import read_competition_pickle, write_competition_pickle
    from model.nets import build_model
    from tasks import registry
    from tasks.settings import Settings

    saved_uri = tracking_utils._tracking_uri
    saved_experiment = fluent._active_experiment_id
    with pytest.MonkeyPatch.context() as mp:
        for name in PIPELINE_ENV:
            mp.delenv(name, raising=False)
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        mp.setenv("CIFAR_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        mp.setenv("AWS_ENDPOINT_URL_S3", module_proxy.url)
        try:
            Settings.from_env().apply()
            torch.manual_seed(0)
            with mlflow.start_run():
                mv = registry.register(
                    build_model("light"), variant="light",
                    tags={"val_acc": "0.5", "data_digest": "x", "val_digest": "y",
                          "recipe": "fast"},
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

            s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
            for bucket in (BUCKET, REFERENCE_BUCKET):
                s3.create_bucket(Bucket=bucket)
            yield Scoring(s3, module_proxy, BUCKET, mv.name, str(mv.version), input_path, ids,
                          digest.hexdigest())
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            tracking_utils._tracking_uri = saved_uri
            fluent._active_experiment_id = saved_experiment


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
            assert entry["uri"] == f"s3://{bucket}/{names[name]}"
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
