"""A real `mlflow server` stopped in the middle of training.

- Gone for good: the run fails with a message that says what to do, and nothing is
  registered (checked once the server is up again).
- Gone at registration: MLflow's HTTP retries back off and then the job fails loudly; the
  registry holds nothing half-made.
- Back after a few epochs: training never waited, every per-epoch metric arrives in order
  once the server is back, and exactly one version is registered.

The tests share one server and run in this order: the first two expect an empty registry.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

import tasks.training
from flows.train import TrainResnetsConfig, train
from tasks.settings import EXPERIMENT, REGISTERED_MODEL
from tests.conftest import SHARED_PARQUET as PARQUET

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.usefixtures("prefect_harness")]

SMALL = dict(variants=["light"], batch_size=32, train_size=96, val_size=48,
             data_source=str(PARQUET))


class RestartableServer:
    """`mlflow server` on a fixed port with a SQLite store, which a test stops and starts."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    def start(self, timeout: float = 90) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mlflow server did not start: "
                                         f"{self.log.read_text()[-3000:]}") from None
                time.sleep(0.2)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.running:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)  # as abrupt as a crashed server
        self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server for the module (it takes seconds to start); tests stop and start it."""
    srv = RestartableServer(tmp_path_factory.mktemp("mlflow"), free_port())
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def server(mlflow_server, tmp_path, monkeypatch):
    """The module's server, running, and this process pointed at it."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "CIFAR_OBJECT_STORE",
                 "CIFAR_ARTIFACT_ROOT", "CIFAR10_SOURCE", "CIFAR_COMPETITION_FILE"):
        monkeypatch.delenv(name, raising=False)
    if not mlflow_server.running:
        mlflow_server.start()
    monkeypatch.setenv("CIFAR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    # Few, quick HTTP retries: each failed attempt of the background sender returns in
    # seconds, and it retries on its own schedule.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    try:
        yield mlflow_server
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def on_epoch(monkeypatch, action) -> list[float]:
    """Call `action(epoch)` after each epoch's metrics were handed over; returns the
    wall-clock seconds each epoch's hand-over took (the training loop's view)."""
    real = tasks.training._EpochLogger.__call__
    handover: list[float] = []

    def wrapped(self, metrics):
        started = time.monotonic()
        real(self, metrics)
        handover.append(time.monotonic() - started)
        action(int(metrics["epoch"]))

    monkeypatch.setattr(tasks.training._EpochLogger, "__call__", wrapped)
    return handover


def versions(url: str) -> list:
    return mlflow.MlflowClient(url).search_model_versions(f"name='{REGISTERED_MODEL}'")


def test_a_server_that_stays_down_fails_the_run_and_registers_nothing(server, monkeypatch):
    monkeypatch.setenv("CIFAR_METRICS_FLUSH_SECONDS", "3")
    on_epoch(monkeypatch, lambda epoch: server.stop() if epoch == 0 else None)
    started = time.monotonic()
    state = train(TrainResnetsConfig(epochs=2, **SMALL), return_state=True)

    assert state.is_failed()
    assert time.monotonic() - started < 120
    with pytest.raises(RuntimeError, match=r"(?s)light-seed0.*TrackingUnavailableError.*"
                       r"did not accept \d+ buffered metric values.*rerun with the same run key"):
        state.result()
    server.start()
    assert versions(server.url) == []
    # The run itself may still read RUNNING (its end could not be recorded), but the
    # experiment holds no registered model.
    assert mlflow.MlflowClient(server.url).get_experiment_by_name(EXPERIMENT) is not None


def test_registration_during_an_outage_backs_off_then_fails_loudly(server, monkeypatch):
    import tasks.registry

    real_register = tasks.registry.register
    attempts = []

    def register_while_down(*args, **kwargs):
        server.stop()
        attempts.append(time.monotonic())
        return real_register(*args, **kwargs)

    monkeypatch.setattr(tasks.registry, "register", register_while_down)
    started = time.monotonic()
    state = train(TrainResnetsConfig(epochs=1, **SMALL), return_state=True)

    assert state.is_failed() and attempts
    # MLflow's HTTP client retried with backoff ("Max retries exceeded"), then the job
    # failed within bounded time.
    assert time.monotonic() - started < 120
    with pytest.raises(RuntimeError, match=r"(?s)light-seed0.*RegistrationError.*could "
                       r"not register.*127\.0\.0\.1.*Max retries exceeded.*rerun with the "
                       r"same run key"):
        state.result()
    server.start()
    assert versions(server.url) == []


def test_metrics_from_an_outage_arrive_in_order_and_one_version_is_registered(
    server, monkeypatch
):
    restarted = threading.Event()

    def fault(epoch: int) -> None:
        if epoch == 0:
            server.stop()
        elif epoch == 2:
            # Back while training goes on: the restart takes seconds, the epochs don't wait.
            threading.Thread(target=lambda: (server.start(), restarted.set()),
                             daemon=True).start()

    handover = on_epoch(monkeypatch, fault)
    summary = train(TrainResnetsConfig(epochs=4, **SMALL))

    assert restarted.is_set()
    # Handing metrics over never blocked on the dead server.
    assert max(handover) < 1.0, handover
    client = mlflow.MlflowClient(server.url)
    [version] = versions(server.url)
    assert summary["versions"]["light-seed0"] == version.version
    history = client.get_metric_history(version.run_id, "val/acc")
    assert [m.step for m in sorted(history, key=lambda m: m.timestamp)] == [0, 1, 2, 3]
    assert client.get_run(version.run_id).info.status == "FINISHED"
