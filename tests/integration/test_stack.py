"""The local stack (`infra/stack.py`) for real: up, status, a second up, pools, workers,
buckets, a dead service restarted, down; then `up --auth` refusing requests without
credentials. The tests run in file order on one stack.

The stack lives in a temporary state directory on free ports of 127.0.0.1 and is brought
down at the end of the module whatever happened.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "infra" / "stack.py"
# Settings of the caller's own services must not steer the stack under test.
CLEARED = ["CIFAR_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE",
           "PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_HOME",
           "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
           "MLFLOW_TRACKING_PASSWORD", "CIFAR_STATE_DIR", "CIFAR_OBJECT_STORE",
           "CIFAR_ALERT_WEBHOOK_URL"]


@dataclass
class Stack:
    state: Path
    root: Path  # <state>/stack
    env: dict[str, str]  # what stack.py runs with
    up: subprocess.CompletedProcess
    up_seconds: float

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(STACK), *args, "--state-dir", str(self.state)],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    @property
    def config(self) -> dict:
        return json.loads((self.root / "stack.json").read_text())

    @property
    def client_env(self) -> dict[str, str]:
        """The variables of <state>/stack/env, as a shell would see them."""
        out = subprocess.run(["bash", "-c", f"set -a; . {self.root / 'env'}; env -0"],
                             env={}, capture_output=True, check=True).stdout
        env = dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)
        return {k: v for k, v in env.items() if k not in ("PWD", "SHLVL", "_")}

    def pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in sorted((self.root / "pids").glob("*.pid"))}

    def api(self, path: str, body: dict | None = None, auth: str | None = None):
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.config['ports']['prefect']}/api{path}",
            data=None if body is None else json.dumps(body).encode(), headers=headers,
            method="GET" if body is None else "POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def _start(state: Path, *args: str) -> Stack:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    stack = Stack(state, state / "stack", env, None, 0.0)  # type: ignore[arg-type]
    began = time.monotonic()
    stack.up = stack.run("up", "--no-deploy", "--cpu-slots", *args)
    stack.up_seconds = time.monotonic() - began
    if stack.up.returncode != 0:
        stack.run("down")
        pytest.fail(f"stack up failed ({stack.up.returncode}):\n{stack.up.stdout}\n"
                    f"{stack.up.stderr}")
    return stack


def _stop(stack: Stack) -> None:
    result = stack.run("down", timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with two CPU-slot workers on the gpu pool (and one on the cpu pool)."""
    started = _start(tmp_path_factory.mktemp("stack-state"), "--workers", "2")
    try:
        yield started
    finally:
        _stop(started)


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.rpartition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_up_starts_every_service_on_loopback_and_status_reports_them_healthy(stack: Stack):
    ports = stack.config["ports"]
    assert sorted(ports) == ["alerts", "mlflow", "moto", "prefect"]
    assert len(set(ports.values())) == 4

    status = stack.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name, port in ports.items():
        line = next(li for li in status.stdout.splitlines() if li.startswith(name))
        assert f"http://127.0.0.1:{port}" in line and line.endswith("ok"), line
        # Bound to 127.0.0.1 only (0100007F in /proc's byte order), never to all interfaces.
        assert _listening(port) and set(_listening(port)) == {"0100007F"}, (name, port)
    assert status.stdout.count("alive") == 3  # two gpu-pool slots, one cpu-pool worker


def test_env_file_points_clients_at_the_stack_and_is_private(stack: Stack):
    env_file = stack.root / "env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    env = stack.client_env
    ports = stack.config["ports"]
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert env["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{ports['moto']}"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"]
    assert env["CIFAR_OBJECT_STORE"] == "s3://cifar-pipeline/objects"
    assert env["CIFAR_STATE_DIR"] == str(stack.state.resolve())
    # moto's credentials are the stack's own random pair, never real ones nor fixed ones.
    secret = json.loads((stack.root / "secrets.json").read_text())
    assert env["AWS_ACCESS_KEY_ID"] == secret["s3_access_key_id"]
    assert env["AWS_ACCESS_KEY_ID"].startswith("STACK")
    assert len(env["AWS_SECRET_ACCESS_KEY"]) >= 40
    assert stat.S_IMODE((stack.root / "secrets.json").stat().st_mode) == 0o600


def test_work_pools_gpu_and_cpu_exist_as_process_pools(stack: Stack):
    for pool in ("gpu", "cpu"):
        assert stack.api(f"/work_pools/{pool}")["type"] == "process"
    # One flow run per gpu-pool worker (each a GPU, here a CPU slot); a third waits in
    # Prefect. The cpu pool's parents only wait on their children: no cap.
    gpu_workers = [n for n in stack.pids() if n.startswith("worker.gpu.")]
    assert len(gpu_workers) == 2
    assert stack.api("/work_pools/gpu")["concurrency_limit"] == len(gpu_workers)
    assert stack.api("/work_pools/cpu")["concurrency_limit"] is None


def test_workers_report_to_their_pools_with_no_gpu_visible(stack: Stack):
    host = next(w for w in stack.pids() if w.startswith("worker.gpu.")).split(".", 2)[2]
    host = host.rsplit("-cpu", 1)[0]
    gpu_pool = {w["name"]: w for w in stack.api("/work_pools/gpu/workers/filter", {})}
    cpu_pool = {w["name"]: w for w in stack.api("/work_pools/cpu/workers/filter", {})}
    assert {f"{host}-cpu0", f"{host}-cpu1"} <= {n for n, w in gpu_pool.items()
                                                 if w["status"] == "ONLINE"}
    assert cpu_pool[f"{host}-cpu0"]["status"] == "ONLINE"

    workers = {n: p for n, p in stack.pids().items() if n.startswith("worker.")}
    assert sorted(workers) == [f"worker.cpu.{host}-cpu0", f"worker.gpu.{host}-cpu0",
                               f"worker.gpu.{host}-cpu1"]
    for name, pid in workers.items():
        proc = psutil.Process(pid)
        assert _alive(proc), name
        assert proc.cmdline()[-2:] == ["--limit", "4" if ".cpu." in name else "1"]
        env = proc.environ()
        assert env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["PREFECT_API_URL"] == stack.client_env["PREFECT_API_URL"]
        assert env["CIFAR10_CACHE_DIR"] == str(stack.state.resolve() / "cache")


def test_buckets_exist_and_mlflow_keeps_artifacts_in_s3(stack: Stack):
    from mlflow import MlflowClient

    env = stack.client_env
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert {"cifar-mlflow", "cifar-pipeline"} <= names

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("stack-smoke"))
    client.log_text(run.info.run_id, "through the server", "note.txt")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="cifar-mlflow")["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys


def test_a_second_up_changes_nothing(stack: Stack):
    before = stack.pids()
    began = time.monotonic()
    again = stack.run("up", "--no-deploy", "--cpu-slots", "--workers", "2")
    seconds = time.monotonic() - began
    assert again.returncode == 0, again.stdout + again.stderr
    assert stack.pids() == before
    assert again.stdout.count("already running") == 7  # 4 services, 3 workers
    assert seconds < stack.up_seconds


def test_up_restarts_a_dead_service_and_leaves_the_others(stack: Stack):
    before = stack.pids()
    moto = psutil.Process(before["moto"])
    os.killpg(before["moto"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(moto) and time.monotonic() < deadline:
        time.sleep(0.1)
    down = stack.run("status")
    assert down.returncode == 1 and "down" in down.stdout

    again = stack.run("up", "--no-deploy", "--cpu-slots", "--workers", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    after = stack.pids()
    assert after["moto"] != before["moto"]
    assert {k: v for k, v in after.items() if k != "moto"} == \
        {k: v for k, v in before.items() if k != "moto"}
    assert stack.run("status").returncode == 0
    # moto keeps objects in memory: the restart lost the buckets, and up made them again.
    s3 = boto3.client("s3", endpoint_url=stack.client_env["AWS_ENDPOINT_URL_S3"],
                      region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    assert {"cifar-mlflow", "cifar-pipeline"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}


def test_down_stops_every_process_it_started_frees_the_ports_and_keeps_the_data(stack: Stack):
    procs = []
    for pid in stack.pids().values():
        leader = psutil.Process(pid)
        procs += [leader, *leader.children(recursive=True)]
    assert len(procs) > len(stack.pids())  # the servers' own children are counted too
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    try:
        result = stack.run("down", timeout=120)
        assert result.returncode == 0, result.stderr
        assert not [p for p in procs if _alive(p)]
        assert bystander.poll() is None  # nothing it did not start
    finally:
        bystander.kill()
        bystander.wait()
    for name, port in stack.config["ports"].items():
        assert _port_free(port), (name, port)
    assert not list((stack.root / "pids").iterdir())
    assert (stack.root / "mlflow.db").is_file()
    assert (stack.root / "prefect" / "prefect.db").is_file()
    assert stack.run("status").returncode == 1
    again = stack.run("down")  # nothing left to stop
    assert again.returncode == 0, again.stderr


def test_auth_refuses_requests_without_credentials(stack: Stack):
    """After `down`, the same state directory comes back up with --auth (a warm database
    starts faster than a fresh one)."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth]")
    up = stack.run("up", "--no-deploy", "--cpu-slots", "--auth", "--workers", "1",
                   "--cpu-pool-workers", "0")
    assert up.returncode == 0, up.stdout + up.stderr
    env = stack.client_env
    assert stat.S_IMODE((stack.root / "secrets.json").stat().st_mode) == 0o600
    prefect_auth = env["PREFECT_API_AUTH_STRING"]
    mlflow_auth = f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}"

    with pytest.raises(urllib.error.HTTPError) as refused:
        stack.api("/work_pools/gpu")
    assert refused.value.code == 401
    gpu_pool = stack.api("/work_pools/gpu", auth=prefect_auth)
    assert gpu_pool["type"] == "process"
    assert gpu_pool["concurrency_limit"] == 1  # follows --workers from 2 down to 1
    # The worker was given the auth string: it reported to its pool since this up began.
    host_worker = next(n for n in stack.pids() if n.startswith("worker.gpu.")).split(".", 2)[2]
    workers = {w["name"]: w for w in
               stack.api("/work_pools/gpu/workers/filter", {}, auth=prefect_auth)}
    assert workers[host_worker]["status"] == "ONLINE"

    search = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(search, headers={
        "Authorization": "Basic " + base64.b64encode(mlflow_auth.encode()).decode()})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200

    # The passwords stay out of the logs and of what up and status print.
    passwords = [env["MLFLOW_TRACKING_PASSWORD"], prefect_auth.split(":", 1)[1]]
    status = stack.run("status")
    assert status.returncode == 0, status.stdout
    for text in [status.stdout, up.stdout, up.stderr,
                 *(p.read_text() for p in (stack.root / "logs").iterdir())]:
        assert not any(p in text for p in passwords)
