"""A registered model whose weights file was changed after registration is refused, by
our loader and by `mlflow.pyfunc.load_model`, through the sha256 recorded at registration."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from model.checkpoint import CheckpointError
from model.nets import build_model
from tasks import registry
from tasks.settings import Settings


@pytest.fixture
def registered(tmp_path, monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "CIFAR_ARTIFACT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    Settings.from_env(tmp_path / "state").apply()
    with mlflow.start_run():
        version = registry.register(build_model("light"), variant="light",
                                    tags={"val_acc": "0.5"}, tta=False)
    registry.set_alias("champion", version.version)
    logged = mlflow.MlflowClient().get_logged_model(version.source.rsplit("/", 1)[-1])
    weights = Path(urlparse(logged.artifact_location).path) / "artifacts" / "weights.pt"
    assert weights.is_file()
    yield weights
    mlflow.set_tracking_uri(None)


def test_untouched_weights_load(registered):
    loaded = registry.load("models:/cifar10-resnet@champion")
    assert loaded.variant == "light" and loaded.weights_sha256 == registry.resolve(
        "models:/cifar10-resnet@champion").tags["weights_sha256"]


def test_changed_weights_are_refused_by_both_loaders(registered):
    data = bytearray(registered.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: still a loadable state_dict, other numbers
    registered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed or corrupted, refusing to load it"):
        registry.load("models:/cifar10-resnet@champion")
    # The logged model's own copy of the loader: its error comes as an MlflowException.
    with pytest.raises(MlflowException, match="changed or corrupted"):
        mlflow.pyfunc.load_model("models:/cifar10-resnet@champion")
