"""Where the pipeline keeps its state, from the environment, with embedded defaults.

With nothing set, everything lives under `./.pipeline/`: the MLflow SQLite database and
artifacts, the local object store, the decoded-data cache and Prefect's own database. On a
cluster the same variables point at shared services instead.

| variable | default | meaning |
|---|---|---|
| CIFAR_STATE_DIR | ./.pipeline | root of every embedded default |
| MLFLOW_TRACKING_URI | sqlite:///<state>/mlflow.db | tracking + registry |
| CIFAR_ARTIFACT_ROOT | <state>/mlartifacts | where a local MLflow store puts artifacts |
| CIFAR_OBJECT_STORE | file://<state>/objects | predictions, checkpoints; or s3://bucket/prefix |
| CIFAR10_SOURCE | torchvision's download | the training data |
| CIFAR10_CACHE_DIR | <state>/cache | decoded-array cache |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

EXPERIMENT = "cifar10-resnet"
REGISTERED_MODEL = "cifar10-resnet"


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    tracking_uri: str
    artifact_root: str
    object_store: str
    data_source: str | None
    cache_dir: Path

    @classmethod
    def from_env(cls, state_dir: str | os.PathLike | None = None) -> Settings:
        env = os.environ
        state = Path(state_dir or env.get("CIFAR_STATE_DIR") or ".pipeline").resolve()
        return cls(
            state_dir=state,
            tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state / 'mlflow.db'}",
            artifact_root=env.get("CIFAR_ARTIFACT_ROOT") or (state / "mlartifacts").as_uri(),
            object_store=env.get("CIFAR_OBJECT_STORE") or (state / "objects").as_uri(),
            data_source=env.get("CIFAR10_SOURCE") or None,
            cache_dir=Path(env.get("CIFAR10_CACHE_DIR") or state / "cache"),
        )

    def apply(self) -> None:
        """Point MLflow at this tracking store and make sure the experiment exists there."""
        import mlflow

        self.state_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        client = mlflow.MlflowClient()
        if client.get_experiment_by_name(EXPERIMENT) is None:
            # A local database keeps its artifacts beside it; a server decides for itself.
            location = self.artifact_root if self.tracking_uri.startswith("sqlite") else None
            try:
                client.create_experiment(EXPERIMENT, artifact_location=location)
            except Exception:
                # Another process created it first.
                if client.get_experiment_by_name(EXPERIMENT) is None:
                    raise
        mlflow.set_experiment(EXPERIMENT)
