"""The train flow against a real `mlflow server` subprocess whose artifacts live on S3.

The server proxies artifacts (`mlflow-artifacts:/`) to the bucket `mlflow-artifacts` on
moto's S3 server; this process talks only HTTP to MLflow, and reads the bucket with a
boto3 client of its own to see where the weights went.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import mlflow
import numpy as np
import pytest

from flows.train import TrainResnetsConfig, train
from tasks.settings import EXPERIMENT, REGISTERED_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARTIFACT_BUCKET = "mlflow-artifacts"


@pytest.fixture(scope="module")
def s3(moto_endpoint: str) -> Any:
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=ARTIFACT_BUCKET)
    return client


@pytest.fixture(scope="module")
def mlflow_server(
    s3: Any,
    moto_endpoint: str,
    spawn: Callable[..., str],
    free_port: Callable[[], int],
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """URL of an `mlflow server` with a SQLite backend and artifacts proxied to moto."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_S3_ENDPOINT_URL=moto_endpoint,
        # The server's background job runner (five huey consumers) is not needed here.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    url = f"http://127.0.0.1:{port}"
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    spawn(
        "mlflow-server",
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}", "--workers", "1"],
        f"{url}/health",
        env=env,
        cwd=root,  # anything the server writes to its working directory stays in tmp
        timeout=90,
    )
    return url


def bucket_keys(s3: Any) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=ARTIFACT_BUCKET)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_train_flow_registers_a_champion_on_the_server_with_artifacts_on_s3(
    mlflow_server: str,
    s3: Any,
    shared_parquet: Path,
    pipeline_env: pytest.MonkeyPatch,
    prefect_harness: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("CIFAR10_CACHE_DIR", str(tmp_path / "cache"))

    summary = train(TrainResnetsConfig(variants=["light"], epochs=1, batch_size=64, train_size=256,
                                val_size=128, data_source=str(shared_parquet)))

    assert mlflow.get_tracking_uri() == mlflow_server
    client = mlflow.MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert summary["promoted"] is True
    assert champion.version == summary["champion"] == summary["versions"]["light-seed0"]
    assert client.get_model_version_by_alias(REGISTERED_MODEL, "light").version == (
        champion.version
    )
    assert champion.tags["variant"] == "light"
    assert champion.tags["data_digest"] == summary["data_digest"]
    # Logged through the server: the experiment's artifacts are proxied, and the run has
    # its per-epoch metric at step 0.
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    history = client.get_metric_history(champion.run_id, "val/acc")
    assert [m.step for m in history] == [0]

    # The weights (and the run's plots) are objects in the moto bucket, byte for byte
    # what the version's sha256 tag says.
    keys = bucket_keys(s3)
    weights = [k for k in keys if k.endswith("/weights.pt")]
    assert len(weights) == 1, keys
    body = s3.get_object(Bucket=ARTIFACT_BUCKET, Key=weights[0])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == champion.tags["weights_sha256"]
    run_files = {k.rsplit("/", 1)[-1] for k in keys if f"/{champion.run_id}/" in k}
    assert {"curves.png", "confusion_matrix.png", "config.json"} <= run_files, keys
    # Nothing went to the embedded defaults' local artifact directory.
    assert not (Path(os.environ["CIFAR_STATE_DIR"]) / "mlartifacts").exists()

    # Users load the champion through the server, as the design promises.
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    probs = np.asarray(model.predict(images))
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
