"""Process supervision of the infra scripts (`infra/procs.py`), without servers: process
records that a reused pid cannot fool, `stop` of a process and everything it started, and
the stack's env file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from infra import procs


def test_a_record_matches_only_the_process_it_was_made_for():
    me = {"pid": os.getpid(), "argv": ["python", *procs.cmdline(os.getpid())[1:]],
          "start_time": procs.proc_stat(os.getpid())[4]}
    assert procs.matches(me)
    assert not procs.matches({**me, "start_time": me["start_time"] + 1})  # pid reused
    assert not procs.matches({**me, "argv": ["prefect", "server", "start"]})
    assert not procs.matches({**me, "pid": 2**22 + 1})


def test_stop_ends_the_process_and_what_it_started_in_another_session(tmp_path):
    # Like a worker whose flow run runs in a session of its own.
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)")
    spec = procs.Spec("job", [sys.executable, "-c", code], dict(os.environ))
    leader = procs.spawn(tmp_path, spec).pid
    deadline = time.monotonic() + 5
    while len(procs.family(leader, leader_alive=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    family = procs.family(leader, leader_alive=True)
    assert len(family) == 2

    assert procs.running(tmp_path, "job")["pid"] == leader
    assert "stopped pid" in procs.stop(tmp_path, "job", timeout=5)
    assert not any(procs.alive(p, s) for p, s in family.items())
    assert not list((tmp_path / "pids").iterdir())


def test_stop_leaves_a_pid_that_now_belongs_to_another_program_alone(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        record = {"pid": bystander.pid, "argv": ["prefect", "worker", "start"]}
        procs.write_text(tmp_path / "pids" / "worker.gpu.h-gpu0.json", json.dumps(record))
        assert "left it alone" in procs.stop(tmp_path, "worker.gpu.h-gpu0")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_env_file_round_trips_values_that_need_quoting(tmp_path):
    env = {"A": "plain", "B": "with space and 'quotes'", "C": ""}
    path = tmp_path / "env"
    path.write_text(procs.render_env_file(env))
    assert procs.read_env_file(path) == env
    shell = subprocess.run(["bash", "-c", f". {path}; printf %s \"$B\""], capture_output=True,
                           text=True, check=True, env={})
    assert shell.stdout == env["B"]
