"""Flows under Prefect's test harness, each test with a state directory of its own.

Everything the pipeline writes (the MLflow SQLite database and artifacts, the local object
store) lives under `CIFAR_STATE_DIR`; the decoded CIFAR-10 arrays are cached once per
session. MLflow keeps its tracking URI and active experiment in process globals (and
mirrors them into the environment), so both are reset around every test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from model.data import Dataset, load_dataset

# The smallest training that still exercises every step (test_train_flow.py trains on
# these sizes, one epoch): a few hundred images.
TRAIN_SIZE = 256
VAL_SIZE = 128

# Environment that would point the pipeline (or MLflow) at state outside the test's own.
_CLEARED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_REGISTRY_URI",
    "CIFAR_OBJECT_STORE",
    "CIFAR_ARTIFACT_ROOT",
    "CIFAR10_SOURCE",
    "CIFAR_COMPETITION_FILE",
)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Decoded arrays of the shared Parquet: the 50,000 JPEGs are decoded once per session."""
    return tmp_path_factory.mktemp("cifar10-cache")


@pytest.fixture(scope="session")
def small_data(shared_parquet: Path, cache_dir: Path) -> Dataset:
    """The split a flow sees with train_size=TRAIN_SIZE, val_size=VAL_SIZE, split seed 0."""
    return load_dataset(str(shared_parquet), val_size=VAL_SIZE, train_size=TRAIN_SIZE, seed=0,
                        cache_dir=cache_dir)


def reset_mlflow() -> None:
    """End any run left active and forget the tracking URI and active experiment."""
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow database. Creating one runs every schema migration
    (seconds); copying this file gives each test a fresh database in milliseconds."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}")
    client.search_experiments()  # creates and migrates the tables
    return path


@contextlib.contextmanager
def isolated_env(state_dir: Path, cache_dir: Path, db_template: Path) -> Iterator[Path]:
    """The pipeline's environment pointed at `state_dir` (with an empty MLflow database
    already there); everything restored afterwards."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if not (state_dir / "mlflow.db").exists():
        shutil.copyfile(db_template, state_dir / "mlflow.db")
    saved = dict(os.environ)
    reset_mlflow()
    for name in _CLEARED_ENV:
        os.environ.pop(name, None)
    os.environ.update({
        "CIFAR_STATE_DIR": str(state_dir),
        "CIFAR10_CACHE_DIR": str(cache_dir),
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
        "GIT_PYTHON_REFRESH": "quiet",
    })
    cwd = os.getcwd()
    # A relative default (MLflow's ./mlflow.db, the CLI's ./.pipeline) lands here, not in
    # the repository.
    os.chdir(state_dir.parent)
    try:
        yield state_dir
    finally:
        os.chdir(cwd)
        reset_mlflow()
        # MLflow (set_tracking_uri, set_experiment) and the CLI write os.environ directly.
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """Where the pipeline keeps its state. A module whose tests share one expensive run
    overrides this with `module_state`."""
    return tmp_path / "state"


@pytest.fixture(scope="module")
def module_state(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, mlflow_db_template: Path
) -> Iterator[Path]:
    state = tmp_path_factory.mktemp("module") / "state"
    with isolated_env(state, cache_dir, mlflow_db_template):
        yield state


@pytest.fixture(autouse=True)
def isolated_state(state_dir: Path, cache_dir: Path, mlflow_db_template: Path) -> Iterator[Path]:
    with isolated_env(state_dir, cache_dir, mlflow_db_template) as state:
        yield state


@pytest.fixture
def tracking(isolated_state: Path) -> mlflow.MlflowClient:
    """MLflow pointed at this test's state directory, as the flows point it."""
    from tasks.settings import Settings

    Settings.from_env().apply()
    return mlflow.MlflowClient()
