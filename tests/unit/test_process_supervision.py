"""The stack's process layer (`infra/procs.py`): the program files supervisord reads, the
one process stopper, the clean-up before a program starts afresh, the restart count
`status` shows, and the env file. One slow test runs a real supervisord."""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from infra import procs

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]

REPO = Path(__file__).resolve().parents[2]


def _sleeper(**kwargs) -> subprocess.Popen:
    return subprocess.Popen(SLEEPER, **kwargs)


def test_a_program_file_keeps_arguments_and_environment_verbatim(tmp_path):
    program = procs.Program("mlflow", ["mlflow", "server", "--opt", "50% off", "a b"],
                            {"PGPASSWORD": 'p%"w'}, user="postgres", fresh=True)
    section = configparser.RawConfigParser()
    section.read_string(program.section(tmp_path))
    body = section["program:mlflow"]
    # supervisord expands %(...)s: a literal % is doubled, and it halves it again.
    assert "50%% off" in body["command"] and "'a b'" in body["command"]
    assert body["command"].split()[:5] == [sys.executable, "-m", "infra.procs", "exec", "--"]
    assert 'PGPASSWORD="p%%\\"w"' in body["environment"]
    assert f'{procs.STACK_ENV}="{tmp_path}"' in body["environment"]
    assert body["autorestart"] == "true" and body["user"] == "postgres"
    assert body["stopasgroup"] == body["killasgroup"] == "true"


def test_stop_processes_terminates_and_kills_what_ignores_sigterm():
    polite = _sleeper()
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('ready', flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline() == "ready\n"
    family = [psutil.Process(polite.pid), psutil.Process(stubborn.pid)]
    assert procs.stop_processes(family, timeout=0.3) == 1  # only the stubborn one killed
    assert [p.returncode for p in family] == [-signal.SIGTERM, -signal.SIGKILL]


def test_a_fresh_start_stops_only_the_leftovers_of_the_same_program(tmp_path):
    base = {**os.environ, procs.STACK_ENV: str(tmp_path)}
    leftover = _sleeper(env={**base, procs.PROGRAM_ENV: "mlflow"}, start_new_session=True)
    sibling = _sleeper(env={**base, procs.PROGRAM_ENV: "prefect"})
    stranger = _sleeper(env={**os.environ, procs.PROGRAM_ENV: "mlflow"})
    try:
        deadline = time.monotonic() + 5
        while len(procs.stack_processes(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # the environment is readable once exec is done
        fresh = subprocess.Popen([sys.executable, "-m", "infra.procs", "exec", "--",
                                  sys.executable, "-c", "print('started')"],
                                 stdout=subprocess.PIPE, text=True, cwd=REPO,
                                 env={**base, procs.PROGRAM_ENV: "mlflow"})
        assert leftover.wait(10) == -signal.SIGTERM  # reaped here: it is this test's child
        assert fresh.communicate(timeout=30)[0].splitlines() == [
            "stopping 1 process(es) an earlier mlflow left", "started"]
        assert sibling.poll() is None and stranger.poll() is None
    finally:
        for p in (leftover, sibling, stranger):
            p.kill()
            p.wait()


def test_restarts_count_unexpected_exits_since_supervisord_last_started(tmp_path):
    supervisor = procs.Supervisor(tmp_path)
    supervisor.log.parent.mkdir(parents=True)
    supervisor.log.write_text(
        "2026-01-01 10:00:00,000 INFO exited: mlflow (exit status 1; not expected)\n"
        "2026-01-01 10:01:00,000 INFO supervisord started with pid 7\n"
        "2026-01-01 10:02:00,000 INFO exited: mlflow (terminated by SIGKILL; not expected)\n"
        "2026-01-01 10:03:00,000 INFO exited: prefect (exit status 0; expected)\n"
        "2026-01-01 10:04:00,000 INFO exited: mlflow (exit status 3; not expected)\n")
    assert supervisor.restarts() == {"mlflow": (2, "2026-01-01 10:04:00 exit status 3")}


@pytest.mark.slow
def test_supervisord_restarts_a_killed_program_and_stop_ends_its_flow_runs(tmp_path):
    """A program that starts a child in a session of its own, as a worker starts flow runs."""
    supervisor = procs.Supervisor(tmp_path)
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)")
    worker = procs.Program("worker.gpu.h-cpu0", [sys.executable, "-c", code],
                           dict(os.environ))
    supervisor.start()
    try:
        assert supervisor.apply([worker]) == ["worker.gpu.h-cpu0: started"]
        first = supervisor.wait_running(worker.name, 15)["pid"]
        assert supervisor.apply([worker]) == []  # unchanged: left alone
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        while supervisor.info()[worker.name]["pid"] in (0, first):
            assert time.monotonic() - killed < 10
            time.sleep(0.1)
        second = supervisor.wait_running(worker.name, 15)["pid"]
        assert supervisor.restarts()[worker.name][0] == 1
        deadline = time.monotonic() + 5
        while not psutil.Process(second).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        family = [psutil.Process(second), *psutil.Process(second).children()]
        assert len(family) == 2
        supervisor.stop([worker.name])
        assert not [p for p in family if p.is_running() and p.status() != "zombie"]
        assert supervisor.programs() == []
    finally:
        supervisor.shutdown()
        procs.stop_processes(procs.stack_processes(tmp_path))


def test_env_file_round_trips_values_that_need_quoting(tmp_path):
    env = {"A": "plain", "B": "with space and 'quotes'", "C": ""}
    path = tmp_path / "env"
    path.write_text(procs.render_env_file(env))
    assert procs.read_env_file(path) == env
    shell = subprocess.run(["bash", "-c", f". {path}; printf %s \"$B\""], capture_output=True,
                           text=True, check=True, env={})
    assert shell.stdout == env["B"]
