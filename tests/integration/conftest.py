"""Shared fixtures of the integration tests: real servers in subprocesses on 127.0.0.1.

Every server starts in its own process group on a free port and is stopped at teardown
with its children (mlflow server forks uvicorn workers). Environment changes go through
`pytest.MonkeyPatch`, so they are undone when the fixture that made them ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
SHARED_PARQUET = SHARED_DATASETS / "cifar10-jpeg" / "train.parquet"
COMPETITION_SAMPLE = SHARED_DATASETS / "competition-sample" / "cifar_test_nolabel_sample.pkl"

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    # pyarrow's S3 client would otherwise ask the EC2 metadata service for a region.
    "AWS_EC2_METADATA_DISABLED": "true",
}
CLEARED_ENV = ["AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]
# Everything tasks.settings.Settings reads, plus what mlflow.set_tracking_uri and
# mlflow.set_experiment write back into os.environ.
PIPELINE_ENV = [
    "CIFAR_STATE_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "CIFAR_ARTIFACT_ROOT",
    "CIFAR_OBJECT_STORE",
    "CIFAR10_SOURCE",
    "CIFAR10_CACHE_DIR",
    "CIFAR_COMPETITION_FILE",
]


def free_port() -> int:
    """A port nothing listens on (right now): for servers, and for 'endpoint down' tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader, or its zombie would keep the group "alive"
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the one spawn created with
    start_new_session=True, so only what it started), SIGKILL what is left after 10 s."""
    if not _group_alive(proc):
        return
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _group_alive(proc) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(proc):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


Spawn = Callable[..., str]


@pytest.fixture(scope="module")
def spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawn]:
    """spawn(name, cmd, ready_url, env=None, cwd=None, timeout=30) -> ready_url, once a GET
    of it answers 2xx.

    Servers started through it are stopped when the test module ends."""
    procs: list[subprocess.Popen] = []

    def start(
        name: str,
        cmd: Sequence[str],
        ready_url: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 30,
    ) -> str:
        log_path = tmp_path_factory.mktemp(name) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        procs.append(proc)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}: {log_path.read_text()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    return ready_url
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{name} did not answer {ready_url} in {timeout:.0f} s: "
                                f"{log_path.read_text()[-4000:]}")
                time.sleep(0.2)

    try:
        yield start
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """Fake credentials and no endpoint override, for the whole test module."""
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED_ENV:
            mp.delenv(name, raising=False)
        for name, value in FAKE_ENV.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def endpoint(aws_env: None, spawn: Spawn) -> str:
    """URL of a moto S3 server (real HTTP) that lives as long as the test module."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
          f"{url}/moto-api/", timeout=30)
    return url


@pytest.fixture(scope="session")
def competition_sample() -> Path:
    """The shared 1,000-image file in the competition's format."""
    if not COMPETITION_SAMPLE.is_file():
        pytest.fail(f"the shared competition sample is missing: {COMPETITION_SAMPLE}")
    return COMPETITION_SAMPLE


@pytest.fixture(scope="session")
def shared_parquet() -> Path:
    """The shared JPEG Parquet copy of the CIFAR-10 training set."""
    if not SHARED_PARQUET.is_file():
        pytest.fail(f"the shared dataset is missing: {SHARED_PARQUET}")
    return SHARED_PARQUET


@pytest.fixture(name="free_port", scope="session")
def free_port_fixture() -> Callable[[], int]:
    """The `free_port` function, for test modules (they cannot import conftest)."""
    return free_port


@pytest.fixture
def closed_endpoint() -> str:
    """An http://127.0.0.1 URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pytest.MonkeyPatch]:
    """A fresh CIFAR_STATE_DIR and no inherited pipeline or MLflow settings, for the whole
    module. MLflow's process-global tracking URI and experiment are restored at the end,
    so later tests (here or in tests/flows) do not write into this module's store."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uri = tracking_utils._tracking_uri
    saved_experiment = fluent._active_experiment_id
    with pytest.MonkeyPatch.context() as mp:
        for name in PIPELINE_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("CIFAR_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        try:
            yield mp
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            tracking_utils._tracking_uri = saved_uri
            fluent._active_experiment_id = saved_experiment
        # Leaving the context now restores MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID.
