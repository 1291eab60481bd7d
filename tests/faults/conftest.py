from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

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
