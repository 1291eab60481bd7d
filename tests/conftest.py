from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
STACK_PARQUET = SHARED / "cifar10-jpeg" / "train.parquet"
STACK_SAMPLE = SHARED / "competition-sample" / "cifar_test_nolabel_sample.pkl"
# Settings of another stack or of the embedded defaults, which must not reach this one.
STACK_CLEARED = ["CIFAR_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
                 "PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_HOME",
                 "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "CIFAR_STATE_DIR",
                 "CIFAR_OBJECT_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
# Modules that use the local stack run last, in this order, on one stack: the end-to-end
# tests expect a fresh registry, the stack fault tests only look at their own runs.
STACK_MODULES = ["test_cluster_e2e.py", "test_stack_faults.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        if "local_stack" not in getattr(item, "fixturenames", ()):
            return -1
        name = item.path.name
        return STACK_MODULES.index(name) if name in STACK_MODULES else len(STACK_MODULES)

    items.sort(key=rank)  # stable: the order within each group is kept


def read_env_file(path: Path) -> dict[str, str]:
    """The `export NAME=value` lines that `infra/stack.py up` writes."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`infra/stack.py up` with two CPU-slot workers on the gpu pool, for the session:
    Prefect server, MLflow server, moto S3, deployments from prefect.yaml. The competition
    file of its workers is the first 200 images of the shared sample."""
    from model.data import read_competition_pickle, write_competition_pickle

    state = tmp_path_factory.mktemp("stack-state")
    env = {k: v for k, v in os.environ.items() if k not in STACK_CLEARED}
    ids, images = read_competition_pickle(STACK_SAMPLE)
    competition = state / "competition-200.pkl"
    write_competition_pickle(competition, ids[:200], images[:200])
    env.update(CIFAR_COMPETITION_FILE=str(competition), CIFAR10_SOURCE=str(STACK_PARQUET))
    cmd = [sys.executable, str(REPO / "infra" / "stack.py")]
    up = subprocess.run([*cmd, "up", "--state-dir", str(state), "--cpu-slots", "--workers", "2"],
                        env=env, capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield {"state": state, "env": env, "cmd": cmd,
               "client_env": read_env_file(state / "stack" / "env")}
    finally:
        subprocess.run([*cmd, "down", "--state-dir", str(state)], env=env, timeout=120)


@pytest.fixture(scope="module")
def stack(local_stack: dict) -> Iterator[dict]:
    """The session's stack, with this process pointed at it for the module: Prefect API,
    MLflow tracking URI and S3 endpoint and credentials."""
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    client_env = local_stack["client_env"]
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in client_env.items():
            mp.setenv(name, value)
        mlflow.set_tracking_uri(client_env["MLFLOW_TRACKING_URI"])
        try:
            # A Prefect test harness started earlier in the session overrides the
            # environment; these settings take precedence over it.
            with temporary_settings(updates={PREFECT_API_URL: client_env["PREFECT_API_URL"]}):
                yield local_stack
        finally:
            mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every test that runs flows; it takes
    seconds to start, so the whole session shares it. Not autouse: tests that run no flow
    do not pay for it."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.testing.utilities import prefect_test_harness

    # Prefect configures logging at its first flow run and binds its console handler to
    # whatever sys.stderr is then; if that is a test's capsys stream, later tests log to a
    # closed file. Configure it now, against the session's stderr.
    ensure_logging_setup()
    # The server subprocess inherits the environment: no telemetry calls from a sandbox,
    # and none racing the harness's first writes to SQLite ("database is locked").
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield
