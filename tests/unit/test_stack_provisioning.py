"""Provisioning by the infra scripts, without servers: GPU detection, the workers and
their pinning, the work pools and their concurrency limits, the deployments' tags, the
stack's settings, and the `stack` subcommand of the command line."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
from pathlib import Path

import pytest
import yaml

from infra import postgres, procs, provision, services, stack, workers
from infra.procs import StackError

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

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
    assert workers.detect_gpus(_runner(NVIDIA_SMI)) == [0, 1]


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
    with pytest.raises(StackError, match=r"GPU\(s\) \[5\] not found"):
        workers.plan("gpu", gpus, only=[5], host="h")


def test_two_runs_share_a_gpu_only_when_asked():
    gpus = workers.parse_gpus(NVIDIA_SMI)
    with pytest.raises(StackError, match="--share-gpu"):
        workers.plan("gpu", gpus, limit=2, host="h")
    shared = workers.plan("gpu", gpus, limit=2, share_gpu=True, host="h")
    assert [w.argv[-2:] for w in shared] == [["--limit", "2"]] * 2


def test_without_gpus_cpu_slots_are_needed_and_see_no_gpu():
    with pytest.raises(StackError, match="--cpu-slots N"):
        workers.plan("gpu", [], host="h")
    plan = workers.plan("gpu", [], cpu_slots=2, host="h")
    assert [(w.name, w.gpu, w.limit) for w in plan] == [("h-cpu0", None, 1), ("h-cpu1", None, 1)]
    assert plan[0].environment({"CUDA_VISIBLE_DEVICES": "0"})["CUDA_VISIBLE_DEVICES"] == ""


def test_stack_plans_cpu_slots_without_gpus_plus_one_cpu_pool_worker(monkeypatch):
    monkeypatch.setattr(workers, "detect_gpus", lambda: [])
    monkeypatch.setattr(procs, "tool", lambda name: f"/venv/bin/{name}")
    plan = provision.worker_plan(None, cpu_slots=False)
    assert [(w.pool, w.gpu, w.limit) for w in plan] == \
        [("gpu", None, 1), ("gpu", None, 1), ("cpu", None, workers.CPU_POOL_LIMIT)]
    assert [w.pool for w in provision.worker_plan(3, False, cpu_pool_workers=0)] == ["gpu"] * 3


def test_stack_plans_one_worker_per_gpu_or_cpu_slots_when_asked(monkeypatch):
    monkeypatch.setattr(workers, "detect_gpus", lambda: workers.parse_gpus(NVIDIA_SMI))
    monkeypatch.setattr(procs, "tool", lambda name: f"/venv/bin/{name}")
    assert [w.gpu for w in provision.worker_plan(None, False) if w.pool == "gpu"] == [0, 1]
    assert [w.gpu for w in provision.worker_plan(1, False) if w.pool == "gpu"] == [0]
    with pytest.raises(StackError, match="2 GPU"):
        provision.worker_plan(3, False)
    slots = [w for w in provision.worker_plan(3, True) if w.pool == "gpu"]
    assert [w.gpu for w in slots] == [None] * 3


def test_the_gpu_pool_is_capped_at_the_runs_its_workers_take(monkeypatch):
    monkeypatch.setattr(workers, "detect_gpus", lambda: workers.parse_gpus(NVIDIA_SMI))
    monkeypatch.setattr(procs, "tool", lambda name: f"/venv/bin/{name}")
    # One run per GPU, per CPU slot, or per GPU and --limit where runs share a GPU.
    assert provision.pool_limits(provision.worker_plan(None, False)) == {"gpu": 2, "cpu": None}
    assert provision.pool_limits(provision.worker_plan(1, False))["gpu"] == 1
    assert provision.pool_limits(provision.worker_plan(3, True))["gpu"] == 3
    gpus = workers.parse_gpus(NVIDIA_SMI)
    assert workers.pool_limit(workers.plan("gpu", gpus, limit=2, share_gpu=True, host="h")) == 4


class FakePrefect:
    """The stack's Prefect API and CLI as provisioning sees them: the pools it has, and
    every change asked of it."""

    def __init__(self, pools: dict[str, dict]):
        self.pools = pools
        self.calls: list[tuple] = []

    def call(self, stack, path, *, method="GET", body=None, timeout=10):
        name = path.removeprefix("/work_pools/")
        if method == "GET":
            if name not in self.pools:
                raise urllib.error.HTTPError(path, 404, "Not Found", {}, None)
            return self.pools[name]
        self.calls.append((method, name, body))
        self.pools[name].update(body)
        return None

    def cli(self, stack, args, log_name, timeout):
        self.calls.append(("cli", *args))
        pool = args[args.index("create") + 1]
        self.pools[pool] = {"type": "process", "concurrency_limit": None}


@pytest.fixture
def prefect(monkeypatch, tmp_path):
    def install(pools):
        fake = FakePrefect(pools)
        monkeypatch.setattr(provision, "prefect_call", fake.call)
        monkeypatch.setattr(provision, "_prefect_cli", fake.cli)
        return fake

    return install


def _stack(tmp_path):
    return services.Stack(tmp_path, {"s3": 1, "prefect": 2, "mlflow": 3, "postgres": 4}, None,
                          False)


def test_up_creates_the_pools_then_caps_the_gpu_pool_only(prefect, tmp_path):
    fake = prefect({})
    provision.ensure_pools(_stack(tmp_path), {"gpu": 2, "cpu": None})
    creates = sorted(c for c in fake.calls if c[0] == "cli")
    assert creates == [("cli", "--no-prompt", "work-pool", "create", p, "--type", "process")
                       for p in ("cpu", "gpu")]
    assert [c for c in fake.calls if c[0] == "PATCH"] == [
        ("PATCH", "gpu", {"concurrency_limit": 2})]
    assert fake.calls.index(("PATCH", "gpu", {"concurrency_limit": 2})) > \
        fake.calls.index(("cli", "--no-prompt", "work-pool", "create", "gpu", "--type",
                          "process"))


def test_up_again_changes_a_pool_limit_only_when_the_workers_changed(prefect, tmp_path):
    fake = prefect({"gpu": {"type": "process", "concurrency_limit": 2},
                    "cpu": {"type": "process", "concurrency_limit": 7}})
    provision.ensure_pools(_stack(tmp_path), {"gpu": 2, "cpu": None})
    assert fake.calls == []  # the cpu pool's own limit, set by someone, is kept
    provision.ensure_pools(_stack(tmp_path), {"gpu": 3, "cpu": None})
    assert fake.calls == [("PATCH", "gpu", {"concurrency_limit": 3})]


def test_a_pool_of_another_type_is_left_alone(prefect, tmp_path, capsys):
    fake = prefect({"gpu": {"type": "kubernetes", "concurrency_limit": None},
                    "cpu": {"type": "process", "concurrency_limit": None}})
    provision.ensure_pools(_stack(tmp_path), {"gpu": 2, "cpu": None})
    assert fake.calls == []
    assert "'gpu' exists with type 'kubernetes'" in capsys.readouterr().out


def test_deployments_on_gpu_pools_are_tagged_gpu_and_others_are_not():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    on_gpu = {d["name"] for d in deployments if d["work_pool"]["name"] == "gpu"}
    tagged = {d["name"] for d in deployments if "gpu" in d.get("tags", [])}
    assert "train-variant" in on_gpu and on_gpu == tagged


def test_ports_are_chosen_once_and_an_external_s3_endpoint_replaces_seaweedfs(tmp_path,
                                                                              monkeypatch):
    monkeypatch.delenv("CIFAR_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    first = stack.configure(tmp_path, auth=None)
    assert stack.configure(tmp_path, auth=None).ports == first.ports
    assert sorted(first.ports) == sorted(services.PORTS)
    assert len(set(first.ports.values())) == len(services.PORTS)
    # Outside the kernel's range for outgoing connections' own ports: none of those can
    # take a port while its server is down.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(10000 <= port < low for port in first.ports.values())
    assert first.stages() == [["postgres", "s3"], ["prefect", "mlflow", "alerts"]]
    assert first.auth  # closed by default
    assert stack.configure(tmp_path, auth=None).auth  # and kept
    assert not stack.configure(tmp_path / "open", auth=False).auth  # --no-auth

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3.internal:9000")
    external = stack.configure(tmp_path, auth=True)  # nothing runs: settings may change
    assert external.stages() == [["postgres"], ["prefect", "mlflow", "alerts"]]
    assert external.s3_endpoint == "http://s3.internal:9000"
    assert "AWS_ACCESS_KEY_ID" not in services.client_env(external)  # the user's own
    assert external.auth and services.client_env(external)["MLFLOW_TRACKING_USERNAME"] == "admin"


def test_cli_stack_runs_the_stack_with_the_state_dir(monkeypatch, tmp_path):
    from flows import cli
    from infra import stack

    calls = []
    monkeypatch.setattr(stack, "main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setenv("CIFAR_STATE_DIR", str(tmp_path))
    args = cli._parser().parse_args(["stack", "up", "--workers", "2", "--cpu-slots"])
    assert args.handler(args) == 0
    assert calls == [["up", "--state-dir", str(tmp_path), "--workers", "2", "--cpu-slots"]]

    args = cli._parser().parse_args(["stack", "down", "--workers", "2"])
    with pytest.raises(ValueError, match="only go with `stack up`"):
        args.handler(args)


def test_cli_main_runs_stack_with_the_resolved_state_dir(monkeypatch, tmp_path, capsys):
    from flows import cli
    from infra import stack

    # main() writes these into os.environ; monkeypatch puts them back afterwards.
    for name in ["CIFAR_STATE_DIR", "PREFECT_HOME", "PREFECT_API_URL", "GIT_PYTHON_REFRESH",
                 "PREFECT_SERVER_ANALYTICS_ENABLED",
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(stack, "main", lambda argv: calls.append(argv) or 3)
    assert cli.main(["--state-dir", str(tmp_path / "s"), "stack", "status"]) == 3
    assert calls[0] == ["status", "--state-dir", str((tmp_path / "s").resolve())]
    assert cli.main(["stack", "status", "--no-deploy"]) == 1
    assert "error: --no-deploy only go with `stack up`" in capsys.readouterr().err


def test_a_stack_json_from_before_a_service_gets_ports_for_it_and_keeps_its_own(tmp_path):
    (tmp_path / "stack.json").write_text(json.dumps(
        {"ports": {"moto": 41001, "prefect": 41002, "mlflow": 41003, "alerts": 41004}}))
    configured = stack.configure(tmp_path, auth=None)
    assert {k: configured.ports[k] for k in ("prefect", "mlflow", "alerts")} == \
        {"prefect": 41002, "mlflow": 41003, "alerts": 41004}
    assert set(services.PORTS) <= set(configured.ports)
    assert len(set(configured.ports.values())) == len(configured.ports)


# ------------------------------------------------------------------ PostgreSQL faults


@pytest.fixture(autouse=True)
def _as_this_user(monkeypatch):
    """initdb and the server as the current user: the checks below come before either."""
    monkeypatch.setattr(postgres, "os_user", lambda: None)


def test_a_cluster_of_another_major_version_is_refused_and_kept(tmp_path):
    data = tmp_path / "postgres"
    data.mkdir()
    (data / "PG_VERSION").write_text("9\n")
    with pytest.raises(StackError, match=r"PostgreSQL 9 cluster .* pg_upgrade"):
        postgres.prepare(_stack(tmp_path), "pw")
    assert (data / "PG_VERSION").read_text() == "9\n"  # never deleted


def test_a_lock_file_whose_pid_is_another_program_names_the_file_to_delete(tmp_path):
    data = tmp_path / "postgres"
    data.mkdir()
    (data / "PG_VERSION").write_text(postgres.major_version(postgres.bin_dir()) + "\n")
    (data / "postmaster.pid").write_text(f"{os.getpid()}\n{data}\n")  # this test, not postgres
    with pytest.raises(StackError, match=r"postmaster.pid names pid \d+, which is now .*delete"):
        postgres.prepare(_stack(tmp_path), "pw")
    (data / "postmaster.pid").write_text("999999999\n")  # a pid that is gone: PostgreSQL's own
    postgres.prepare(_stack(tmp_path), "pw")


def test_initdb_out_of_disk_space_says_how_much_to_free(tmp_path, monkeypatch):
    def full(user, argv, **kwargs):
        if "initdb" not in argv[0]:
            return subprocess.CompletedProcess(argv, 0, "", "")
        return subprocess.CompletedProcess(argv, 1, "", 'initdb: error: could not write to '
                                           'file "base/1/1259": No space left on device')

    monkeypatch.setattr(postgres, "_run_as", full)
    with pytest.raises(StackError, match=r"ran out of disk space .* free some space"):
        postgres.prepare(_stack(tmp_path), "pw")


class _Supervisor:
    """Nothing running; records what `up` would start."""

    def __init__(self):
        self.started = []

    def info(self):
        return {}

    def apply(self, programs):
        self.started += [p.name for p in programs]
        raise StackError("stop here")  # past the port checks: that is all these tests need


def _with_port(tmp_path, port: int) -> services.Stack:
    configured = _stack(tmp_path)
    configured.ports = {**stack.configure(tmp_path, auth=None).ports, "postgres": port}
    return configured


def test_a_port_taken_by_another_program_fails_up_before_starting_anything(tmp_path,
                                                                           monkeypatch):
    import socket

    monkeypatch.setattr(postgres, "prepare", lambda *a: None)
    monkeypatch.setattr(stack, "PORT_WAIT", 0.3)
    supervisor = _Supervisor()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        configured = _with_port(tmp_path, taken.getsockname()[1])
        with pytest.raises(StackError, match=rf"port \d+ for postgres is taken by pid "
                                             rf"{os.getpid()} \(.*\), .* delete"):
            stack.ensure_services(configured, supervisor, timeout=5)
    assert supervisor.started == []


def test_a_port_released_while_up_waits_is_used(tmp_path, monkeypatch):
    """A killed server of this stack, still dying, holds its port for a moment."""
    import socket
    import threading

    monkeypatch.setattr(postgres, "prepare", lambda *a: None)
    supervisor = _Supervisor()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    configured = _with_port(tmp_path, taken.getsockname()[1])
    threading.Timer(0.2, taken.close).start()
    with pytest.raises(StackError, match="stop here"):
        stack.ensure_services(configured, supervisor, timeout=5)
    assert supervisor.started == ["postgres", "s3"]


def test_mlflow_runs_no_more_workers_than_cores_unless_told(tmp_path, monkeypatch):
    monkeypatch.setattr(services, "tool", lambda name: name)
    monkeypatch.delenv("MLFLOW_WORKERS", raising=False)
    config = services.Stack(tmp_path, {name: 1 for name in services.PORTS}, None, auth=False)
    for cores, workers_ in [(2, "2"), (64, "4"), (None, "1")]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert services._mlflow_program(config).env["MLFLOW_WORKERS"] == workers_
    monkeypatch.setenv("MLFLOW_WORKERS", "8")  # mlflow server's own setting wins
    assert services._mlflow_program(config).env["MLFLOW_WORKERS"] == "8"
