"""The worker launcher and stack scripts of infra/, without servers: GPU detection, the
worker commands and their pinning, process records, and the `stack` subcommand."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

INFRA = Path(__file__).resolve().parents[2] / "infra"


def _load(name: str) -> ModuleType:
    # infra/ is not a package and is never imported by the project: load the scripts by path.
    spec = importlib.util.spec_from_file_location(f"cifar_infra_{name}", INFRA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


stack = _load("stack")
workers = stack.workers  # the copy stack.py uses, so that monkeypatching reaches it

NVIDIA_SMI = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-2222-3333-4444-555555555555)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-66666666-7777-8888-9999-000000000000)
  MIG 3g.40gb     Device  0: (UUID: MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee)
"""


def _runner(stdout: str = "", returncode: int = 0, raises: Exception | None = None):
    def run(argv, **kwargs):
        assert argv == ["nvidia-smi", "-L"]
        if raises is not None:
            raise raises
        return subprocess.CompletedProcess(argv, returncode, stdout, "driver not loaded")

    return run


def test_gpus_are_the_gpu_lines_of_nvidia_smi_and_mig_lines_are_not_counted():
    gpus = workers.detect_gpus(_runner(NVIDIA_SMI))
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert gpus[1].uuid == "GPU-66666666-7777-8888-9999-000000000000"


def test_no_nvidia_smi_or_a_failing_one_means_no_gpu(capsys):
    assert workers.detect_gpus(_runner(raises=FileNotFoundError("nvidia-smi"))) == []
    assert workers.detect_gpus(_runner("", returncode=9)) == []
    assert "driver not loaded" in capsys.readouterr().err
    assert workers.detect_gpus(_runner("No devices found.\n")) == []


def test_one_worker_per_gpu_each_pinned_to_its_gpu_and_taking_one_run():
    gpus = workers.parse_gpus(NVIDIA_SMI)
    plan = workers.plan("gpu", gpus, host="node7", prefect="/venv/bin/prefect")
    assert [w.name for w in plan] == ["node7-gpu0", "node7-gpu1"]
    assert plan[1].argv == ["/venv/bin/prefect", "worker", "start", "--pool", "gpu",
                            "--type", "process", "--name", "node7-gpu1", "--limit", "1"]
    env = plan[1].environment({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # nvidia-smi's numbering
    assert env["PATH"] == "/bin"
    assert plan[1].file_name == "worker.gpu.node7-gpu1"
    # Idle workers poll every 2 s unless the environment says otherwise.
    assert env["PREFECT_WORKER_QUERY_SECONDS"] == "2"
    assert plan[1].environment({"PREFECT_WORKER_QUERY_SECONDS": "15"})[
        "PREFECT_WORKER_QUERY_SECONDS"] == "15"


def test_only_some_gpus_and_unknown_ones_are_refused():
    gpus = workers.parse_gpus(NVIDIA_SMI)
    assert [w.gpu for w in workers.plan("gpu", gpus, only=[1], host="h")] == [1]
    with pytest.raises(workers.StackError, match=r"GPU\(s\) \[5\] not found"):
        workers.plan("gpu", gpus, only=[5], host="h")


def test_two_runs_share_a_gpu_only_when_asked():
    gpus = workers.parse_gpus(NVIDIA_SMI)
    with pytest.raises(workers.StackError, match="--share-gpu"):
        workers.plan("gpu", gpus, limit=2, host="h")
    shared = workers.plan("gpu", gpus, limit=2, share_gpu=True, host="h")
    assert [w.argv[-2:] for w in shared] == [["--limit", "2"]] * 2


def test_without_gpus_cpu_slots_are_needed_and_see_no_gpu():
    with pytest.raises(workers.StackError, match="--cpu-slots N"):
        workers.plan("gpu", [], host="h")
    plan = workers.plan("gpu", [], cpu_slots=2, host="h")
    assert [(w.name, w.gpu, w.limit) for w in plan] == [("h-cpu0", None, 1), ("h-cpu1", None, 1)]
    assert plan[0].environment({"CUDA_VISIBLE_DEVICES": "0"})["CUDA_VISIBLE_DEVICES"] == ""


def test_stack_plans_cpu_slots_without_gpus_plus_one_cpu_pool_worker(monkeypatch):
    monkeypatch.setattr(workers, "detect_gpus", lambda: [])
    monkeypatch.setattr(workers, "tool", lambda name: f"/venv/bin/{name}")
    plan = stack.worker_plan(None, cpu_slots=False)
    assert [(w.pool, w.gpu, w.limit) for w in plan] == \
        [("gpu", None, 1), ("gpu", None, 1), ("cpu", None, workers.CPU_POOL_LIMIT)]
    assert [w.pool for w in stack.worker_plan(3, False, cpu_pool_workers=0)] == ["gpu"] * 3


def test_stack_plans_one_worker_per_gpu_or_cpu_slots_when_asked(monkeypatch):
    monkeypatch.setattr(workers, "detect_gpus", lambda: workers.parse_gpus(NVIDIA_SMI))
    monkeypatch.setattr(workers, "tool", lambda name: f"/venv/bin/{name}")
    assert [w.gpu for w in stack.worker_plan(None, False) if w.pool == "gpu"] == [0, 1]
    assert [w.gpu for w in stack.worker_plan(1, False) if w.pool == "gpu"] == [0]
    with pytest.raises(workers.StackError, match="2 GPU"):
        stack.worker_plan(3, False)
    slots = [w for w in stack.worker_plan(3, True) if w.pool == "gpu"]
    assert [w.gpu for w in slots] == [None] * 3


def test_a_record_matches_only_the_process_it_was_made_for():
    me = {"pid": os.getpid(), "argv": ["python", *workers.cmdline(os.getpid())[1:]],
          "start_time": workers._proc_stat(os.getpid())[4]}
    assert workers.matches(me)
    assert not workers.matches({**me, "start_time": me["start_time"] + 1})  # pid reused
    assert not workers.matches({**me, "argv": ["prefect", "server", "start"]})
    assert not workers.matches({**me, "pid": 2**22 + 1})


def test_stop_ends_the_process_and_what_it_started_in_another_session(tmp_path):
    # Like a worker whose flow run runs in a session of its own.
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], start_new_session=True); time.sleep(60)")
    spec = workers.Spec("job", [sys.executable, "-c", code], dict(os.environ))
    leader = workers.spawn(tmp_path, spec).pid
    deadline = time.monotonic() + 5
    while len(workers.family(leader, leader_alive=True)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    family = workers.family(leader, leader_alive=True)
    assert len(family) == 2

    assert workers.running(tmp_path, "job")["pid"] == leader
    assert "stopped pid" in workers.stop(tmp_path, "job", timeout=5)
    assert not any(workers._running(p, s) for p, s in family.items())
    assert not list((tmp_path / "pids").iterdir())


def test_stop_leaves_a_pid_that_now_belongs_to_another_program_alone(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        record = {"pid": bystander.pid, "argv": ["prefect", "worker", "start"]}
        workers._write_atomically(tmp_path / "pids" / "worker.gpu.h-gpu0.json",
                                  __import__("json").dumps(record))
        assert "left it alone" in workers.stop(tmp_path, "worker.gpu.h-gpu0")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_env_file_round_trips_values_that_need_quoting(tmp_path):
    env = {"A": "plain", "B": "with space and 'quotes'", "C": ""}
    path = tmp_path / "env"
    path.write_text(stack.render_env_file(env))
    assert workers.read_env_file(path) == env
    shell = subprocess.run(["bash", "-c", f". {path}; printf %s \"$B\""], capture_output=True,
                           text=True, check=True, env={})
    assert shell.stdout == env["B"]


def test_ports_are_chosen_once_and_an_external_s3_endpoint_replaces_moto(tmp_path, monkeypatch):
    monkeypatch.delenv("CIFAR_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    first = stack.configure(tmp_path, auth=None)
    assert stack.configure(tmp_path, auth=None).ports == first.ports
    assert first.services() == ["moto", "prefect", "mlflow"]
    assert not first.auth

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio.internal:9000")
    external = stack.configure(tmp_path, auth=True)  # nothing runs: settings may change
    assert external.services() == ["prefect", "mlflow"]
    assert external.s3_endpoint == "http://minio.internal:9000"
    assert "AWS_ACCESS_KEY_ID" not in stack.client_env(external)  # the user's own, not moto's
    assert external.auth and stack.client_env(external)["MLFLOW_TRACKING_USERNAME"] == "admin"


def test_cli_stack_runs_the_script_with_the_state_dir(monkeypatch, tmp_path):
    from flows import cli

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setenv("CIFAR_STATE_DIR", str(tmp_path))
    args = cli._parser().parse_args(["stack", "up", "--workers", "2", "--cpu-slots"])
    assert args.handler(args) == 0
    assert calls == [[sys.executable, str(INFRA / "stack.py"), "up", "--state-dir",
                      str(tmp_path), "--workers", "2", "--cpu-slots"]]

    args = cli._parser().parse_args(["stack", "down", "--workers", "2"])
    with pytest.raises(ValueError, match="only go with `stack up`"):
        args.handler(args)


def test_cli_stack_says_so_when_infra_is_missing(monkeypatch, tmp_path):
    import flows
    from flows import cli

    monkeypatch.setattr(flows, "__file__", str(tmp_path / "site-packages" / "flows" / "x.py"))
    monkeypatch.setenv("CIFAR_STATE_DIR", str(tmp_path))
    args = cli._parser().parse_args(["stack", "status"])
    with pytest.raises(ValueError, match="infra/ is not part of the installed package"):
        cli.cmd_stack(argparse.Namespace(**vars(args)))


def test_cli_main_runs_stack_with_the_resolved_state_dir(monkeypatch, tmp_path, capsys):
    from flows import cli

    # main() writes these into os.environ; monkeypatch puts them back afterwards.
    for name in ["CIFAR_STATE_DIR", "PREFECT_HOME", "PREFECT_API_URL", "GIT_PYTHON_REFRESH",
                 "PREFECT_SERVER_ANALYTICS_ENABLED",
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 3)
    assert cli.main(["--state-dir", str(tmp_path / "s"), "stack", "status"]) == 3
    assert calls[0][2:] == ["status", "--state-dir", str((tmp_path / "s").resolve())]
    assert cli.main(["stack", "status", "--no-deploy"]) == 1
    assert "error: --no-deploy only go with `stack up`" in capsys.readouterr().err
