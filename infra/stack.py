"""The local stack: Prefect server, MLflow server, S3 (moto) and workers, on 127.0.0.1.

    python infra/stack.py up [--state-dir DIR] [--workers N] [--cpu-slots] [--no-deploy]
                             [--cpu-pool-workers N] [--auth | --no-auth] [--timeout S]
    python infra/stack.py status [--state-dir DIR]
    python infra/stack.py down [--state-dir DIR]

`up` starts what is not already running, each in its own session with its log in
`<state>/stack/logs/` and its pid in `<state>/stack/pids/`:
  - moto's S3 server, unless CIFAR_S3_ENDPOINT or AWS_ENDPOINT_URL_S3 names an endpoint;
  - `prefect server start` (SQLite under `<state>/stack/prefect`);
  - `mlflow server` (SQLite `<state>/stack/mlflow.db`, artifacts proxied to
    s3://cifar-mlflow/artifacts);
then waits until they answer, creates the buckets `cifar-mlflow` and `cifar-pipeline`,
the process work pools `gpu` and `cpu`, runs `prefect deploy --all` in the repository
(unless --no-deploy), and starts the workers with `infra/workers.py`: one per GPU on the
`gpu` pool (or N CPU slots where there is no GPU, or with --cpu-slots), and one worker on
the `cpu` pool. Ports are chosen on the first `up` and kept in `<state>/stack/stack.json`.
The settings clients need go to `<state>/stack/env`: `source` it to use the stack.

A service whose recorded process is alive and answers is left alone, so `up` can be run
again at any time; a dead one is restarted on its port. `down` stops exactly the recorded
processes (and what they started) and keeps the data. `--auth` turns on MLflow's
basic-auth app and Prefect's API auth string, with passwords generated once and kept in
`<state>/stack/secrets.json` (mode 0600).

Standard library, boto3 and the `prefect`, `mlflow` and moto command lines. Never
imported by the project's code.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import importlib.util
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

HOST = "127.0.0.1"  # every service binds here: nothing is reachable from other machines
REPO = Path(__file__).resolve().parents[1]
ARTIFACT_BUCKET = "cifar-mlflow"
OBJECT_BUCKET = "cifar-pipeline"
POOLS = ("gpu", "cpu")
DEFAULT_CPU_SLOTS = 2  # gpu-pool workers on a machine without GPUs
CPU_POOL_WORKERS = 1  # workers on the cpu pool (parent flows, data preparation)
HEALTH_TIMEOUT = 180.0  # seconds for all services to answer; Prefect's first start migrates
WORKER_TIMEOUT = 90.0  # seconds for the workers to report to their pools
MOTO_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # pyarrow would ask EC2 for a region otherwise
}
MLFLOW_USER = "admin"
PREFECT_USER = "admin"


def _load_workers():
    # infra/ is not a package; load the sibling script by path.
    spec = importlib.util.spec_from_file_location("cifar_infra_workers",
                                                  Path(__file__).with_name("workers.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


workers = _load_workers()
StackError = workers.StackError


# --------------------------------------------------------------------- configuration


@dataclass
class Stack:
    """What `up` decided once and later commands reuse: ports, S3 endpoint, auth."""

    root: Path  # <state>/stack
    ports: dict[str, int]
    s3_external: str | None  # an endpoint of the user's; None: moto on ports["moto"]
    auth: bool

    @property
    def state_dir(self) -> Path:
        return self.root.parent

    @property
    def config_path(self) -> Path:
        return self.root / "stack.json"

    @property
    def s3_endpoint(self) -> str:
        return self.s3_external or f"http://{HOST}:{self.ports['moto']}"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.ports['prefect']}"

    @property
    def prefect_api(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    def services(self) -> list[str]:
        return (["moto"] if self.s3_external is None else []) + ["prefect", "mlflow"]

    def save(self) -> None:
        body = {"host": HOST, "ports": self.ports, "s3_external_endpoint": self.s3_external,
                "auth": self.auth}
        workers._write_atomically(self.config_path, json.dumps(body, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> Stack | None:
        try:
            body = json.loads((root / "stack.json").read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as e:
            raise StackError(f"{root / 'stack.json'} is not valid JSON ({e}); "
                             "delete it to choose new ports") from e
        return cls(root, {k: int(v) for k, v in body["ports"].items()},
                   body.get("s3_external_endpoint"), bool(body.get("auth")))


def external_s3_endpoint(env: Mapping[str, str]) -> str | None:
    return env.get("CIFAR_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL_S3") or None


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on now (the sockets stay open until all
    are chosen, so the kernel cannot hand out one twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- secrets


def _new_secrets() -> dict[str, str]:
    return {
        # moto accepts any credentials: each stack gets its own random pair, so that no
        # real key is ever handed to it and a leak of these is recognisable.
        "s3_access_key_id": f"STACK{secrets.token_hex(8).upper()}",
        "s3_secret_access_key": secrets.token_urlsafe(30),
        "mlflow_admin_password": secrets.token_urlsafe(24),
        "mlflow_flask_secret_key": secrets.token_urlsafe(32),
        "prefect_api_auth_string": f"{PREFECT_USER}:{secrets.token_urlsafe(24)}",
    }


def secrets_for(stack: Stack) -> dict[str, str]:
    """Credentials generated on the first `up` and kept (0600) for later ones: the MLflow
    admin user is created with the first password it is given."""
    path = stack.root / "secrets.json"
    values = json.loads(path.read_text()) if path.exists() else {}
    missing = {k: v for k, v in _new_secrets().items() if k not in values}
    if missing:
        values.update(missing)
        workers._write_atomically(path, json.dumps(values, indent=2) + "\n", mode=0o600)
    return values


def moto_env(stack: Stack) -> dict[str, str]:
    """What clients of the stack's moto server (and moto itself) are given."""
    secret = secrets_for(stack)
    return {**MOTO_ENV, "AWS_ACCESS_KEY_ID": secret["s3_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": secret["s3_secret_access_key"]}


def mlflow_auth_config(stack: Stack, secret: Mapping[str, str]) -> Path:
    path = stack.root / "mlflow-auth.ini"
    workers._write_atomically(path, "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = sqlite:///{stack.root / 'mlflow-auth.db'}",
        f"admin_username = {MLFLOW_USER}",
        f"admin_password = {secret['mlflow_admin_password']}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "",
    ]), mode=0o600)
    return path


# ------------------------------------------------------------------------ environment


def client_env(stack: Stack) -> dict[str, str]:
    """What a client of the stack needs (the env file, the workers, the prefect CLI)."""
    env = {
        "PREFECT_API_URL": stack.prefect_api,
        "MLFLOW_TRACKING_URI": stack.mlflow_url,
        "AWS_ENDPOINT_URL_S3": stack.s3_endpoint,
        "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint,
        "CIFAR_OBJECT_STORE": f"s3://{OBJECT_BUCKET}/objects",
        "CIFAR_STATE_DIR": str(stack.state_dir),
        # prefect.yaml's pull step: the workers run the code of this checkout.
        "CIFAR_PROJECT_DIR": os.environ.get("CIFAR_PROJECT_DIR") or str(REPO),
    }
    if stack.s3_external is None:
        env.update(moto_env(stack))
    if stack.auth:
        secret = secrets_for(stack)
        env["PREFECT_API_AUTH_STRING"] = secret["prefect_api_auth_string"]
        env["MLFLOW_TRACKING_USERNAME"] = MLFLOW_USER
        env["MLFLOW_TRACKING_PASSWORD"] = secret["mlflow_admin_password"]
    return env


def render_env_file(env: Mapping[str, str]) -> str:
    lines = ["# The local stack's settings: `source` this file to use it. Written by "
             "infra/stack.py up."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    return "\n".join(lines) + "\n"


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    # Settings of another Prefect API or MLflow server must not leak into this stack.
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING",
                 "PREFECT_PROFILE", "PREFECT_SERVER_API_AUTH_STRING",
                 "PREFECT_API_DATABASE_CONNECTION_URL",
                 "PREFECT_SERVER_DATABASE_CONNECTION_URL", "MLFLOW_TRACKING_URI",
                 "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    return env


def prefect_home(stack: Stack) -> Path:
    return stack.root / "prefect"


def tool_env(stack: Stack) -> dict[str, str]:
    """The environment of the prefect CLI calls and the workers."""
    env = _base_env()
    env["PREFECT_HOME"] = str(prefect_home(stack))
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.update(client_env(stack))
    env["CIFAR10_CACHE_DIR"] = str(stack.state_dir / "cache")
    return env


# --------------------------------------------------------------------------- services


def service_spec(stack: Stack, name: str) -> workers.Spec:
    port = str(stack.ports[name])
    env = _base_env()
    if name == "moto":
        env.update(moto_env(stack))
        argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", port]
        return workers.Spec(name, argv, env, str(stack.root))
    if name == "prefect":
        home = prefect_home(stack)
        home.mkdir(parents=True, exist_ok=True)
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            # The UI's browser code calls this URL; its default is port 4200.
            PREFECT_UI_API_URL=f"{stack.prefect_api}",
        )
        if stack.auth:
            env["PREFECT_SERVER_API_AUTH_STRING"] = secrets_for(stack)["prefect_api_auth_string"]
        argv = [workers.tool("prefect"), "server", "start", "--host", HOST, "--port", port]
        return workers.Spec(name, argv, env, str(stack.root))
    if name == "mlflow":
        env.update(
            MLFLOW_S3_ENDPOINT_URL=stack.s3_endpoint,
            # The job runner (huey consumers for GenAI jobs) is not used by this project.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        )
        if stack.s3_external is None:
            env.update(moto_env(stack))
        argv = [workers.tool("mlflow"), "server", "--host", HOST, "--port", port,
                "--backend-store-uri", f"sqlite:///{stack.root / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/artifacts",
                "--workers", "1"]
        if stack.auth:
            secret = secrets_for(stack)
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(mlflow_auth_config(stack, secret))
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret["mlflow_flask_secret_key"]
            argv += ["--app-name", "basic-auth"]
        return workers.Spec(name, argv, env, str(stack.root))
    raise ValueError(f"unknown service {name!r}")


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


# The servers are on this machine: never ask an HTTP proxy from the environment for them.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, headers: Mapping[str, str] | None = None, timeout: float = 5) -> bytes:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    with _LOCAL.open(request, timeout=timeout) as response:
        return response.read()


def prefect_headers(stack: Stack) -> dict[str, str]:
    if not stack.auth:
        return {}
    return {"Authorization": _basic(secrets_for(stack)["prefect_api_auth_string"])}


def s3_client(stack: Stack):
    import boto3
    from botocore.config import Config

    options = {}
    if stack.s3_external is None:
        env = moto_env(stack)
        options = {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                   "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1})
    return boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name=region,
                        config=config, **options)


def healthy(stack: Stack, name: str) -> bool:
    """Does the service answer its health check right now?"""
    try:
        if name == "moto":
            s3_client(stack).list_buckets()
        elif name == "prefect":
            _get(f"{stack.prefect_api}/health", prefect_headers(stack))
        elif name == "mlflow":
            _get(f"{stack.mlflow_url}/health")  # unauthenticated even with basic-auth
        else:
            raise ValueError(f"unknown service {name!r}")
    except Exception:  # any failure to answer is "down"; the log says why
        return False
    return True


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def wait_healthy(stack: Stack, started: Mapping[str, subprocess.Popen], timeout: float) -> None:
    pending = dict(started)
    deadline = time.monotonic() + timeout
    while pending:
        for name, proc in list(pending.items()):
            log = workers.log_path(stack.root, name)
            if proc.poll() is not None:
                raise StackError(f"{name} exited with status {proc.returncode} while "
                                 f"starting; its log, {log}, ends:\n{_log_tail(log)}")
            if healthy(stack, name):
                print(f"  {name:<8} up after {time.monotonic() - deadline + timeout:.1f} s")
                del pending[name]
        if pending and time.monotonic() > deadline:
            names = ", ".join(pending)
            raise StackError(f"{names} did not answer in {timeout:.0f} s; see "
                             + ", ".join(str(workers.log_path(stack.root, n)) for n in pending))
        if pending:
            time.sleep(0.5)


def ensure_services(stack: Stack, timeout: float) -> None:
    started = {}
    for name in stack.services():
        record = workers.running(stack.root, name)
        wanted = service_spec(stack, name)
        if record is not None and record.get("argv") == wanted.argv and healthy(stack, name):
            print(f"  {name:<8} already running (pid {record['pid']})")
            continue
        if record is not None:
            print(f"  {workers.stop(stack.root, name)} (not answering or other settings)")
        port = stack.ports[name]
        if not port_free(port):
            raise StackError(f"port {port} for {name} is taken by a process this stack did "
                             f"not start; stop it, or delete {stack.config_path} so that "
                             "`up` picks new ports")
        started[name] = workers.spawn(stack.root, wanted)
        print(f"  {name:<8} starting on {HOST}:{port} (pid {started[name].pid})")
    wait_healthy(stack, started, timeout)


# ------------------------------------------------------------ buckets, pools, deploy


def ensure_buckets(stack: Stack) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(stack)
    try:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in (ARTIFACT_BUCKET, OBJECT_BUCKET):
            if bucket in existing:
                continue
            region = client.meta.region_name
            extra = ({} if region == "us-east-1"
                     else {"CreateBucketConfiguration": {"LocationConstraint": region}})
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=bucket, **extra)
            print(f"  bucket s3://{bucket} created")
    except (BotoCoreError, ClientError) as e:
        raise StackError(f"creating the buckets {ARTIFACT_BUCKET} and {OBJECT_BUCKET} at "
                         f"{stack.s3_endpoint} failed: {e}; check the endpoint and the "
                         "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from e


def _prefect_cli(stack: Stack, args: list[str], log_name: str, timeout: float) -> None:
    log = workers.log_path(stack.root, log_name)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [workers.tool("prefect"), *args]
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        out.flush()
        try:
            result = subprocess.run(argv, cwd=REPO, env=tool_env(stack), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise StackError(f"`prefect {' '.join(args)}` took over {timeout:.0f} s; "
                             f"see {log}") from e
    if result.returncode != 0:
        raise StackError(f"`prefect {' '.join(args)}` failed ({result.returncode}); "
                         f"its output, {log}, ends:\n{_log_tail(log)}")


def ensure_pools(stack: Stack) -> None:
    missing = []
    for pool in POOLS:
        try:
            body = json.loads(_get(f"{stack.prefect_api}/work_pools/{pool}",
                                   prefect_headers(stack)))
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise StackError(f"reading work pool {pool!r} failed: HTTP {e.code}; see "
                                 f"{workers.log_path(stack.root, 'prefect')}") from e
        except OSError as e:
            raise StackError(f"the Prefect server at {stack.prefect_url} stopped answering "
                             f"({e}); see {workers.log_path(stack.root, 'prefect')}") from e
        else:
            if body.get("type") != "process":
                print(f"  warning: work pool {pool!r} exists with type {body.get('type')!r}, "
                      "not 'process'; left as it is")
            continue
        missing.append(pool)

    def create(pool: str) -> None:
        # The CLI fills in the process worker's default base job template.
        _prefect_cli(stack, ["--no-prompt", "work-pool", "create", pool, "--type", "process"],
                     f"prefect-cli-{pool}", timeout=120)

    with ThreadPoolExecutor(max(len(missing), 1)) as threads:
        list(threads.map(create, missing))
    for pool in missing:
        print(f"  work pool {pool!r} created")


def deploy(stack: Stack) -> None:
    if not (REPO / "prefect.yaml").is_file():
        raise StackError(f"no prefect.yaml in {REPO}, so nothing to deploy; "
                         "pass --no-deploy to bring the stack up without deployments")
    print("  prefect deploy --all ...", flush=True)
    _prefect_cli(stack, ["--no-prompt", "deploy", "--all"], "deploy", timeout=600)
    print(f"  deployed (log: {workers.log_path(stack.root, 'deploy')})")


def worker_plan(count: int | None, cpu_slots: bool,
                cpu_pool_workers: int = CPU_POOL_WORKERS) -> list:
    """gpu-pool workers (one per GPU, or CPU slots) and the cpu pool's workers."""
    prefect = workers.tool("prefect")
    gpus = [] if cpu_slots else workers.detect_gpus()
    if cpu_slots or not gpus:
        gpu_pool = workers.plan("gpu", [], cpu_slots=count or DEFAULT_CPU_SLOTS,
                                prefect=prefect)
    else:
        if count is not None and count > len(gpus):
            raise StackError(f"--workers {count}, but this machine has {len(gpus)} GPU(s); "
                             "pass --cpu-slots to run workers without a GPU")
        chosen = [g.index for g in gpus][:count] if count else None
        gpu_pool = workers.plan("gpu", gpus, only=chosen, prefect=prefect)
    if cpu_pool_workers == 0:
        return gpu_pool
    cpu_pool = workers.plan("cpu", [], cpu_slots=cpu_pool_workers,
                            limit=workers.CPU_POOL_LIMIT, prefect=prefect)
    return gpu_pool + cpu_pool


def read_pool_workers(stack: Stack, pool: str) -> dict[str, dict]:
    request = urllib.request.Request(
        f"{stack.prefect_api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
        headers={"Content-Type": "application/json", **prefect_headers(stack)})
    with _LOCAL.open(request, timeout=10) as response:
        return {w["name"]: w for w in json.loads(response.read())}


def _reported_since(worker: Mapping, started_at: float) -> bool:
    beat = worker.get("last_heartbeat_time")
    if worker.get("status") != "ONLINE" or not beat:
        return False
    # The server and the worker share this machine's clock; allow for rounding.
    return datetime.fromisoformat(beat).timestamp() >= started_at - 1


def ensure_workers(stack: Stack, plan: list, timeout: float) -> None:
    root = stack.root
    keep = {w.file_name for w in plan}
    for line in workers.stop_workers(root, keep=keep):
        print(f"  {line} (no longer wanted)")
    env = tool_env(stack)
    for worker, pid, started in workers.start_workers(root, plan, env, cwd=str(REPO)):
        gpu = "no GPU" if worker.gpu is None else f"GPU {worker.gpu}"
        state = "started" if started else "already running"
        print(f"  worker {worker.name} on pool {worker.pool} ({gpu}, limit {worker.limit}): "
              f"pid {pid}, {state}")
    # Up means the workers poll: wait until each has reported to its pool.
    deadline = time.monotonic() + timeout
    missing = {(w.pool, w.name) for w in plan}
    # A worker that was just (re)started must report anew: its pool may still list an
    # earlier process of the same name as online.
    since = {(w.pool, w.name): (workers.read_record(root, w.file_name) or {}).get("started_at", 0)
             for w in plan}
    while missing:
        for w in plan:
            if (w.pool, w.name) in missing and workers.running(root, w.file_name) is None:
                log = workers.log_path(root, w.file_name)
                raise StackError(f"worker {w.name} exited while starting; its log, {log}, "
                                 f"ends:\n{_log_tail(log)}")
        for pool in {p for p, _ in missing}:
            with contextlib.suppress(OSError, ValueError):
                for name, seen in read_pool_workers(stack, pool).items():
                    if (pool, name) in missing and _reported_since(seen, since[(pool, name)]):
                        missing.discard((pool, name))
        if missing and time.monotonic() > deadline:
            names = ", ".join(n for _, n in sorted(missing))
            raise StackError(f"worker(s) {names} did not report to their pool in "
                             f"{timeout:.0f} s; see {root / 'logs'}")
        if missing:
            time.sleep(1)
    print(f"  {len(plan)} worker(s) online")


# --------------------------------------------------------------------------- commands


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One `up` or `down` at a time per state directory."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another `up` or `down` on {root} ...", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _any_running(root: Path) -> bool:
    return any(workers.matches(r) for r in workers.records(root).values())


def configure(root: Path, auth: bool | None) -> Stack:
    """The stack of stack.json, or a new one with free ports; settings that cannot change
    under running services (S3 endpoint, auth) are checked here."""
    external = external_s3_endpoint(os.environ)
    stack = Stack.load(root)
    if stack is None:
        names = ["moto", "prefect", "mlflow"]
        stack = Stack(root, dict(zip(names, free_ports(len(names)), strict=True)), external,
                      bool(auth))
        stack.save()
        return stack
    changes = {}
    if external != stack.s3_external:
        changes["S3 endpoint"] = (stack.s3_external or "moto", external or "moto")
    if auth is not None and auth != stack.auth:
        changes["auth"] = ("on" if stack.auth else "off", "on" if auth else "off")
    if changes:
        if _any_running(root):
            what = "; ".join(f"{k}: running with {a}, asked for {b}"
                             for k, (a, b) in changes.items())
            raise StackError(f"the stack is running with other settings ({what}); run "
                             "`down` first, then `up` again")
        stack.s3_external = external
        stack.auth = stack.auth if auth is None else auth
        if "moto" not in stack.ports:
            stack.ports["moto"] = free_ports(1)[0]
        stack.save()
    return stack


def check_auth_support() -> None:
    """MLflow's basic-auth app needs Flask-WTF (the `mlflow[auth]` extra); say so before
    starting anything rather than in a traceback in mlflow.log."""
    if importlib.util.find_spec("flask_wtf") is None:
        raise StackError("--auth needs MLflow's basic-auth app, which needs Flask-WTF: "
                         f"{sys.executable} -m pip install 'mlflow[auth]'")


def cmd_up(args: argparse.Namespace) -> int:
    root = workers.stack_dir(args.state_dir)
    began = time.monotonic()
    with locked(root):
        stack = configure(root, args.auth)
        if stack.auth:
            check_auth_support()
        print(f"stack under {root}")
        ensure_services(stack, args.timeout)
        workers._write_atomically(root / "env", render_env_file(client_env(stack)), mode=0o600)
        ensure_buckets(stack)
        ensure_pools(stack)
        if not args.no_deploy:
            deploy(stack)
        plan = worker_plan(args.workers, args.cpu_slots, args.cpu_pool_workers)
        ensure_workers(stack, plan, WORKER_TIMEOUT)
    print(f"up in {time.monotonic() - began:.1f} s\n")
    print_status(stack)
    print(f"\nuse it from a shell:  source {root / 'env'}")
    return 0


def print_status(stack: Stack) -> bool:
    urls = {"moto": stack.s3_endpoint, "prefect": stack.prefect_url, "mlflow": stack.mlflow_url}
    ok = True
    for name in stack.services():
        record = workers.running(stack.root, name)
        health = healthy(stack, name)
        ok = ok and health and record is not None
        pid = record["pid"] if record else "-"
        print(f"{name:<8} {urls[name]:<28} pid {pid!s:<8} {'ok' if health else 'down'}")
    if stack.s3_external is not None:
        health = healthy(stack, "moto")  # the same list_buckets check, on the user's endpoint
        ok = ok and health
        print(f"{'s3':<8} {stack.s3_endpoint:<28} {'external':<12} {'ok' if health else 'down'}")
    rows = workers.worker_status(stack.root)
    for name, pid, alive in rows:
        ok = ok and alive
        print(f"{name:<37} pid {pid:<8} {'alive' if alive else 'down'}")
    if not rows:
        ok = False
        print("no workers")
    if stack.auth:
        print(f"auth     on (credentials in {stack.root / 'env'})")
    return ok


def cmd_status(args: argparse.Namespace) -> int:
    root = workers.stack_dir(args.state_dir)
    stack = Stack.load(root)
    if stack is None:
        print(f"no stack under {root}; start one with `up`")
        return 1
    return 0 if print_status(stack) else 1


def cmd_down(args: argparse.Namespace) -> int:
    root = workers.stack_dir(args.state_dir)
    if not (root / "pids").is_dir():
        print(f"nothing recorded under {root / 'pids'}; nothing to stop")
        return 0
    with locked(root):
        # Workers first, so that they do not lose their server mid-run; the servers last.
        lines = workers.stop_workers(root)
        order = ["mlflow", "prefect", "moto"]
        others = [n for n in workers.records(root) if n not in order]
        lines += workers._stop_many(root, others + [n for n in order
                                                    if workers.read_record(root, n)])
        for name in (root / "pids").glob("*.pid"):  # pid files without a record
            name.unlink(missing_ok=True)
    for line in lines:
        print(line)
    print(f"stopped; data kept under {root}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infra/stack.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="default $CIFAR_STATE_DIR, else ./.pipeline")
    up = sub.add_parser("up", parents=[common], help="start what is not running")
    up.add_argument("--workers", type=int, metavar="N",
                    help="gpu-pool workers: default one per GPU, or 2 CPU slots without GPUs")
    up.add_argument("--cpu-slots", action="store_true",
                    help="run the gpu-pool workers without a GPU even where there are GPUs")
    up.add_argument("--cpu-pool-workers", type=int, default=CPU_POOL_WORKERS, metavar="N",
                    help="workers on the cpu pool (parent flows, data preparation; default "
                         f"{CPU_POOL_WORKERS}, each taking {workers.CPU_POOL_LIMIT} runs)")
    up.add_argument("--no-deploy", action="store_true", help="skip `prefect deploy --all`")
    up.add_argument("--auth", action=argparse.BooleanOptionalAction, default=None,
                    help="MLflow basic-auth and a Prefect API auth string (kept once chosen)")
    up.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT,
                    help=f"seconds for the services to answer (default {HEALTH_TIMEOUT:.0f})")
    up.set_defaults(handler=cmd_up)
    sub.add_parser("status", parents=[common], help="URLs, pids, health; exit 1 if not all ok"
                   ).set_defaults(handler=cmd_status)
    sub.add_parser("down", parents=[common], help="stop what up started; keep the data"
                   ).set_defaults(handler=cmd_down)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "workers", None) is not None and args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if getattr(args, "cpu_pool_workers", 0) < 0:
        print("error: --cpu-pool-workers must be at least 0", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.action == "up":
            print("what did start keeps running: `status` lists it, `down` stops it, and "
                  "`up` again starts the rest", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
