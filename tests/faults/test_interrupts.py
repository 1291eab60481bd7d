"""Ctrl-C and SIGTERM in the middle of an epoch of `cifar-pipeline train`, a real process:
Ctrl-C as a terminal sends it (SIGINT to the whole process group, DataLoader workers
included), SIGTERM as a scheduler or `kill` does (to the command alone).

Each must end the command within seconds with one line that names the signal and a
resume command whose run key is the one the checkpoint was saved under; leave the Prefect
flow run Crashed or Failed and no MLflow run RUNNING (both read from the state directory
afterwards); and leave none of the command's processes alive: the embedded Prefect server
(in a session of its own, so that Ctrl-C cannot kill it first), the DataLoader workers.

The SIGINT run also has an HTTP proxy configured that accepts no connection, and no
NO_PROXY: the command must reach its embedded server directly. The SIGTERM run keeps its
state in a directory named with `?`, `%` and `#`, which SQLite URLs must quote: its
databases must be inside it, and nothing created beside it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import SHARED_PARQUET as PARQUET

REPO = Path(__file__).resolve().parents[2]
# From the signal to the exit. The interrupt lands once the running torch operation
# returns (well under a second, unless the machine is busy), then recording the runs'
# ends and stopping the children takes about two seconds.
EXIT_BUDGET_SECONDS = 15
EPOCHS = 50  # never reached: the signal comes during the second epoch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The decoded shared Parquet, so that each run reads arrays instead of 50,000 JPEGs."""
    from model.data import load_arrays

    if not PARQUET.exists():
        pytest.fail(f"the shared dataset is missing: {PARQUET}")
    cache = tmp_path_factory.mktemp("cifar10-cache")
    load_arrays(str(PARQUET), cache_dir=cache)
    return cache


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Command:
    """`cifar-pipeline train` in a process group of its own, its output collected."""

    def __init__(self, state: Path, cache: Path, env: dict[str, str]):
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("MLFLOW_", "PREFECT_", "CIFAR", "AWS_"))
                and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        base.update(CIFAR10_CACHE_DIR=str(cache), MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
                    PYTHONUNBUFFERED="1", **env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "--state-dir", str(state), "train",
             "--variants", "light", "--recipe", "reference", "--epochs", str(EPOCHS),
             "--train-size", "128", "--val-size", "32", "--batch-size", "8",
             "--data", str(PARQUET), "--device", "cpu", "--checkpoint-seconds", "0"],
            cwd=REPO, env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # its own group: what a terminal gives a foreground job
        self.lines: list[str] = []
        self.child_cmdlines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_checkpoint(self, state: Path, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not list((state / "objects").rglob("checkpoint.pt")):
            if self.process.poll() is not None:
                self._reader.join(5)
                pytest.fail("the command ended before its first checkpoint:\n"
                            + "\n".join(self.lines))
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint within {timeout} s:\n" + "\n".join(self.lines))
            time.sleep(0.1)

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def kill(self, also: list[psutil.Process]) -> None:
        for process in [psutil.Process(self.process.pid), *also]:
            with contextlib.suppress(psutil.Error):
                process.kill()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _interrupt_mid_epoch(state: Path, cache: Path, signum: int, *, group: bool,
                         env: dict[str, str] | None = None) -> tuple[Command, list, float, int]:
    """Start a training, signal it during its second epoch; (command, its children when
    signalled, seconds to exit, output lines before the signal)."""
    command = Command(state, cache, env or {})
    children: list[psutil.Process] = []
    try:
        command.wait_for_checkpoint(state)  # the first epoch's
        time.sleep(1.0)  # into the second epoch
        children = command.children()
        command.child_cmdlines = [" ".join(c.cmdline()) for c in children]
        before = len(command.lines)
        signalled = time.monotonic()
        if group:
            os.killpg(command.process.pid, signum)
        else:
            command.process.send_signal(signum)
        try:
            command.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the command did not exit within 60 s of the signal:\n"
                        + "\n".join(command.lines))
        elapsed = time.monotonic() - signalled
        command._reader.join(10)
        return command, children, elapsed, before
    finally:
        if command.process.poll() is None:
            command.kill(children)


def _check(state: Path, command: Command, children: list, elapsed: float, before: int,
           signum: int) -> None:
    name = signal.Signals(signum).name
    output = "\n".join(command.lines)
    assert command.process.returncode == 128 + signum, output
    assert elapsed < EXIT_BUDGET_SECONDS, f"exit took {elapsed:.1f} s:\n{output}"

    after = command.lines[before:]
    said = [line for line in after if line.startswith("interrupted by")]
    assert len(said) == 1 and said[0].startswith(f"interrupted by {name}:"), output
    assert not any("Traceback" in line for line in after), output
    # The advice is a command line that resumes the run whose checkpoint was saved.
    advice = shlex.split(said[0].split(" with: ", 1)[1])
    assert advice[:1] == ["cifar-pipeline"] and "train" in advice
    run_key = advice[advice.index("--run-key") + 1]
    checkpoints = list((state / "objects").rglob("checkpoint.pt"))
    assert checkpoints and all(run_key in c.parts for c in checkpoints), checkpoints

    with sqlite3.connect(state / "prefect" / "prefect.db") as db:
        flow_states = [r[0] for r in db.execute("select state_type from flow_run")]
        task_states = [r[0] for r in db.execute("select state_type from task_run")]
    assert flow_states and set(flow_states) <= {"CRASHED", "FAILED"}, flow_states
    assert "RUNNING" not in task_states, task_states
    with sqlite3.connect(state / "mlflow.db") as db:
        run_states = [r[0] for r in db.execute("select status from runs")]
    assert len(run_states) >= 2 and set(run_states) <= {"KILLED", "FAILED"}, run_states

    # What there was to stop: the Prefect server and the DataLoader workers.
    names = " ".join(command.child_cmdlines)
    assert "prefect server start" in names and len(children) >= 2, names
    survivors = [p for p in children if _alive(p)]
    assert not survivors, [(p.pid, p.cmdline()) for p in survivors]


def test_ctrl_c_to_the_process_group_mid_epoch(tmp_path: Path, cache_dir: Path) -> None:
    proxy = f"http://127.0.0.1:{_closed_port()}"  # a proxy that is not there
    state = tmp_path / "state"
    command, children, elapsed, before = _interrupt_mid_epoch(
        state, cache_dir, signal.SIGINT, group=True,
        env={"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "ALL_PROXY": proxy,
             "http_proxy": proxy, "https_proxy": proxy})
    _check(state, command, children, elapsed, before, signal.SIGINT)


def test_sigterm_to_the_command_mid_epoch(tmp_path: Path, cache_dir: Path) -> None:
    state = tmp_path / "run?v=1 100%#x"
    command, children, elapsed, before = _interrupt_mid_epoch(
        state, cache_dir, signal.SIGTERM, group=False)
    _check(state, command, children, elapsed, before, signal.SIGTERM)
    assert (state / "mlflow.db").is_file() and (state / "prefect" / "prefect.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name]
