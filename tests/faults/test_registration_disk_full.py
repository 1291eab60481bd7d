"""The disk fills up while a model is being registered: the artifact store has written
half of the weights file when the next write fails with ENOSPC (injected where MLflow
copies a model's files into a local artifact store).

The run must end FAILED, not RUNNING; no version may be registered; and the half file
must not stay behind, where it would look like a model's weights. The error names the
disk and what to do, not the tracking server.
"""

from __future__ import annotations

import errno
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

from model.nets import build_model
from tasks import registry
from tasks.settings import Settings
from tasks.tracking import tracked_run


def _torn_copy(self: LocalArtifactRepository, local_dir: str, artifact_path=None) -> None:
    """Half of each file of the model, then the disk is full."""
    source = Path(local_dir)
    destination = Path(self.artifact_dir) / (artifact_path or "")
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        target = destination / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        if path.name == "weights.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))


def test_a_full_disk_during_registration_fails_the_run_and_leaves_no_half_model(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    Settings.from_env(state).apply()
    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", _torn_copy)
    torch.manual_seed(0)
    with pytest.raises(registry.RegistrationError) as raised, tracked_run() as run:
        registry.register(build_model("light"), variant="light", tags={"val_acc": "0.1"},
                          tta=False)
    message = str(raised.value)
    assert "no space left on the disk" in message and "free some space" in message
    assert "tracking server" not in message

    client = mlflow.MlflowClient()
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert client.search_model_versions(f"name='{registry.REGISTERED_MODEL}'") == []
    assert not list(state.rglob("weights.pt")), "the half-written weights are still there"
    # The run's record of the model is gone too, not only its files.
    experiment = client.get_run(run.info.run_id).info.experiment_id
    assert client.search_logged_models(experiment_ids=[experiment]) == []
