"""The local stack (`python -m infra.stack`) for real: up, status, a second up, pools, workers,
buckets, PostgreSQL and SeaweedFS's S3 holding the data, a killed service restarted by
supervisord, every process SIGKILLed and the stack brought back (with auth now on) with its
data, requests without credentials refused, then down keeping the data. The tests run in
file order on one stack.

The stack lives in a temporary state directory on free ports of 127.0.0.1 and is brought
down at the end of the module whatever happened.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import psutil
import pytest

from infra.services import port_free
from tests.conftest import stack_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
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
            [sys.executable, "-m", "infra.stack", *args, "--state-dir", str(self.state)],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
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
        return stack_pids(self.state)

    def s3(self):
        env = self.client_env
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"],
                            region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

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
def stack(stack_state_dir: Callable[[], Path]) -> Iterator[Stack]:
    """A stack with two CPU-slot workers on the gpu pool (and one on the cpu pool), auth
    off until test_auth_refuses_requests_without_credentials turns it on."""
    started = _start(stack_state_dir(), "--workers", "2", "--no-auth")
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


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


SERVICES = ["postgres", "s3", "prefect", "mlflow", "alerts"]


def _read_when_ready(stack: Stack, key: str, timeout: float = 60) -> bytes:
    """The object at `key`, read again while a restarted SeaweedFS answers 500."""
    from botocore.exceptions import ClientError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return stack.s3().get_object(Bucket="cifar-pipeline", Key=key)["Body"].read()
        except ClientError as e:
            if e.response["Error"]["Code"] != "InternalError" or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_up_starts_every_service_on_loopback_and_status_reports_them_healthy(stack: Stack):
    ports = stack.config["ports"]
    assert {"postgres", "s3", "prefect", "mlflow", "alerts"} <= set(ports)
    assert len(set(ports.values())) == len(ports)

    status = stack.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name in SERVICES:
        line = next(li for li in status.stdout.splitlines() if li.startswith(name))
        assert f"127.0.0.1:{ports[name]}" in line and " RUNNING " in line, line
        assert line.endswith("ok"), line
    # Every port, SeaweedFS's gRPC ones too, on 127.0.0.1 only (0100007F in /proc's byte
    # order), never on all interfaces.
    for name, port in ports.items():
        assert _listening(port) and set(_listening(port)) == {"0100007F"}, (name, port)
    assert sum(li.startswith("worker.") and li.endswith("ok")
               for li in status.stdout.splitlines()) == 3  # two gpu slots, one cpu worker
    # Data and logs are their owner's alone; others may only pass through the stack's
    # folder (PostgreSQL's user must, when the stack runs as root).
    for private in ("postgres", "s3", "logs", "prefect", "supervisor"):
        assert stat.S_IMODE((stack.root / private).stat().st_mode) == 0o700, private
    assert stat.S_IMODE(stack.root.stat().st_mode) == 0o711
    assert "warning: auth is off" in stack.up.stderr


def test_a_foreign_host_header_is_refused_by_prefect_and_mlflow(stack: Stack):
    """What a web page gets through DNS rebinding: its own name in the Host header."""
    ports = stack.config["ports"]
    for url, refused in [
            (f"http://127.0.0.1:{ports['prefect']}/api/work_pools/gpu", 400),
            (f"http://127.0.0.1:{ports['mlflow']}/api/2.0/mlflow/experiments/search"
             "?max_results=1", 403)]:
        request = urllib.request.Request(url, headers={"Host": "attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10)
        assert answer.value.code == refused, url
        with urllib.request.urlopen(url, timeout=10) as response:  # its own name
            assert response.status == 200


def test_env_file_points_clients_at_the_stack_and_is_private(stack: Stack):
    env_file = stack.root / "env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    env = stack.client_env
    ports = stack.config["ports"]
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['prefect']}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert env["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{ports['s3']}"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"]
    assert env["CIFAR_OBJECT_STORE"] == "s3://cifar-pipeline/objects"
    assert env["CIFAR_STATE_DIR"] == str(stack.state.resolve())
    # The S3 server's credentials are the stack's own random pair.
    secret = json.loads((stack.root / "secrets.json").read_text())
    assert env["AWS_ACCESS_KEY_ID"] == secret["s3_access_key_id"]
    assert env["AWS_ACCESS_KEY_ID"].startswith("STACK")
    assert len(env["AWS_SECRET_ACCESS_KEY"]) >= 40
    assert stat.S_IMODE((stack.root / "secrets.json").stat().st_mode) == 0o600
    # The supervisor's program files hold the database password: private too.
    for conf in (stack.root / "supervisor" / "programs").glob("*.conf"):
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600, conf


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


def test_mlflow_keeps_runs_in_postgresql_and_artifacts_in_s3(stack: Stack):
    import psycopg
    from mlflow import MlflowClient

    s3 = stack.s3()
    assert {"cifar-mlflow", "cifar-pipeline"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}
    # The S3 server checks credentials: a made-up pair is refused.
    stranger = boto3.client("s3", endpoint_url=stack.client_env["AWS_ENDPOINT_URL_S3"],
                            region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")
    with pytest.raises(Exception, match=r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch"):
        stranger.list_objects_v2(Bucket="cifar-pipeline")

    client = MlflowClient(tracking_uri=stack.client_env["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("stack-smoke"))
    client.log_text(run.info.run_id, "through the server", "note.txt")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="cifar-mlflow")["Contents"]]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
    password = json.loads((stack.root / "secrets.json").read_text())["postgres_password"]
    with psycopg.connect(host="127.0.0.1", port=stack.config["ports"]["postgres"],
                         user="cifar", password=password, dbname="mlflow") as conn:
        found = conn.execute("SELECT run_uuid FROM runs WHERE run_uuid = %s",
                             (run.info.run_id,)).fetchall()
    assert found == [(run.info.run_id,)]
    s3.put_object(Bucket="cifar-pipeline", Key="objects/survives.txt", Body=b"kept")


def test_a_second_up_changes_nothing(stack: Stack):
    before = stack.pids()
    began = time.monotonic()
    again = stack.run("up", "--no-deploy", "--cpu-slots", "--workers", "2")
    seconds = time.monotonic() - began
    assert again.returncode == 0, again.stdout + again.stderr
    assert stack.pids() == before
    assert ": started" not in again.stdout and "restarted" not in again.stdout, again.stdout
    assert seconds < stack.up_seconds


def test_a_killed_service_or_worker_is_restarted_by_itself(stack: Stack):
    before = stack.pids()
    worker = next(n for n in before if n.startswith("worker.gpu."))
    for name in ("mlflow", "s3", worker):
        os.kill(before[name], signal.SIGKILL)
    killed = time.monotonic()
    while any(stack.pids().get(n) in (None, before[n]) for n in ("mlflow", "s3", worker)):
        assert time.monotonic() - killed < 10, stack.pids()
        time.sleep(0.2)
    # Nothing else was touched, and each comes back to health on its own.
    after = stack.pids()
    assert {n: p for n, p in after.items() if n not in ("mlflow", "s3", worker)} == \
        {n: p for n, p in before.items() if n not in ("mlflow", "s3", worker)}
    deadline = time.monotonic() + 120
    while (status := stack.run("status")).returncode != 0:
        assert time.monotonic() < deadline, status.stdout
        time.sleep(2)
    lines = {li.split()[0]: li for li in status.stdout.splitlines() if li.strip()}
    for name in ("mlflow", "s3", worker):
        assert "restarted 1x" in lines[name] and "SIGKILL" in lines[name], lines[name]
    # SeaweedFS lost nothing on the way (it lists before its volume server has
    # re-registered, and answers reads with a retryable 500 until then).
    assert _read_when_ready(stack, "objects/survives.txt") == b"kept"


def test_a_stack_whose_every_process_was_killed_comes_back_with_its_data(stack: Stack):
    """SIGKILL to supervisord and everything under it, as a power cut or the OOM killer
    would; then `up`, here with auth switched on (allowed: nothing runs any more)."""
    victims = [psutil.Process(int((stack.root / "supervisor" / "supervisord.pid")
                                  .read_text()))]
    for pid in stack.pids().values():
        leader = psutil.Process(pid)
        victims += [leader, *leader.children(recursive=True)]
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(victims, timeout=10)
    stack.up = stack.run("up", "--no-deploy", "--cpu-slots", "--auth", "--workers", "1",
                         "--cpu-pool-workers", "0")
    assert stack.up.returncode == 0, stack.up.stdout + stack.up.stderr
    assert stack.run("status").returncode == 0
    assert _read_when_ready(stack, "objects/survives.txt") == b"kept"


def test_auth_refuses_requests_without_credentials(stack: Stack):
    """The stack the previous test brought back with --auth: its data still there."""
    up = stack.up
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

    search = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=5"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(search, headers={
        "Authorization": "Basic " + base64.b64encode(mlflow_auth.encode()).decode()})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        # The experiment made before `down` is still in PostgreSQL.
        assert "stack-smoke" in response.read().decode()

    # The passwords stay out of the logs and of what up and status print.
    passwords = [env["MLFLOW_TRACKING_PASSWORD"], prefect_auth.split(":", 1)[1]]
    status = stack.run("status")
    assert status.returncode == 0, status.stdout
    for text in [status.stdout, up.stdout, up.stderr,
                 *(p.read_text() for p in (stack.root / "logs").iterdir())]:
        assert not any(p in text for p in passwords)


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
        assert port_free(port), (name, port)
    assert (stack.root / "postgres" / "PG_VERSION").is_file()
    assert list((stack.root / "s3").iterdir())
    assert stack.run("status").returncode == 1
    again = stack.run("down")  # nothing left to stop
    assert again.returncode == 0, again.stderr
