"""The local stack's services: its settings (ports, S3 endpoint, auth, kept in
`<state>/stack/stack.json`), credentials, environments, and the servers themselves (moto's
S3, `prefect server`, `mlflow server`, the alert receiver of `infra/alerts.py`): how each
starts, how it is checked, and `ensure_services`, which starts what is not already running
and answering.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from infra.procs import (
    Spec,
    StackError,
    log_path,
    log_tail,
    running,
    spawn,
    stop,
    tool,
    write_text,
)
from tasks.settings import sqlite_uri

HOST = "127.0.0.1"  # every service binds here: nothing is reachable from other machines
REPO = Path(__file__).resolve().parents[1]
ARTIFACT_BUCKET = "cifar-mlflow"
OBJECT_BUCKET = "cifar-pipeline"
HEALTH_TIMEOUT = 180.0  # seconds for all services to answer; Prefect's first start migrates
MOTO_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # pyarrow would ask EC2 for a region otherwise
}
MLFLOW_USER = "admin"
PREFECT_USER = "admin"


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

    @property
    def alerts_url(self) -> str:  # where alerts go without CIFAR_ALERT_WEBHOOK_URL
        return f"http://{HOST}:{self.ports['alerts']}"

    @property
    def alerts_file(self) -> Path:
        return self.root / "alerts.jsonl"

    def services(self) -> list[str]:
        return (["moto"] if self.s3_external is None else []) + ["prefect", "mlflow", "alerts"]

    def save(self) -> None:
        body = {"host": HOST, "ports": self.ports, "s3_external_endpoint": self.s3_external,
                "auth": self.auth}
        write_text(self.config_path, json.dumps(body, indent=2) + "\n")

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
        write_text(path, json.dumps(values, indent=2) + "\n", mode=0o600)
    return values


def moto_env(stack: Stack) -> dict[str, str]:
    """What clients of the stack's moto server (and moto itself) are given."""
    secret = secrets_for(stack)
    return {**MOTO_ENV, "AWS_ACCESS_KEY_ID": secret["s3_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": secret["s3_secret_access_key"]}


def mlflow_auth_config(stack: Stack, secret: Mapping[str, str]) -> Path:
    path = stack.root / "mlflow-auth.ini"
    write_text(path, "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = {sqlite_uri(stack.root / 'mlflow-auth.db')}",
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


def service_spec(stack: Stack, name: str) -> Spec:
    port = str(stack.ports[name])
    env = _base_env()
    if name == "moto":
        env.update(moto_env(stack))
        argv = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", port]
        return Spec(name, argv, env, str(stack.root))
    if name == "prefect":
        home = prefect_home(stack)
        home.mkdir(parents=True, exist_ok=True)
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=sqlite_uri(home / "prefect.db",
                                                              "sqlite+aiosqlite"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            # The UI's browser code calls this URL; its default is port 4200.
            PREFECT_UI_API_URL=f"{stack.prefect_api}",
            # Links in automation messages (`flow_run|ui_url`); none without it.
            PREFECT_UI_URL=stack.prefect_url,
        )
        if stack.auth:
            env["PREFECT_SERVER_API_AUTH_STRING"] = secrets_for(stack)["prefect_api_auth_string"]
        argv = [tool("prefect"), "server", "start", "--host", HOST, "--port", port]
        return Spec(name, argv, env, str(stack.root))
    if name == "mlflow":
        env.update(
            MLFLOW_S3_ENDPOINT_URL=stack.s3_endpoint,
            # The job runner (huey consumers for GenAI jobs) is not used by this project.
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        )
        if stack.s3_external is None:
            env.update(moto_env(stack))
        argv = [tool("mlflow"), "server", "--host", HOST, "--port", port,
                "--backend-store-uri", sqlite_uri(stack.root / "mlflow.db"),
                "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/artifacts",
                "--workers", "1"]
        if stack.auth:
            secret = secrets_for(stack)
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(mlflow_auth_config(stack, secret))
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret["mlflow_flask_secret_key"]
            argv += ["--app-name", "basic-auth"]
        return Spec(name, argv, env, str(stack.root))
    if name == "alerts":
        argv = [sys.executable, str(REPO / "infra" / "alerts.py"), "serve", "--host", HOST,
                "--port", port, "--out", str(stack.alerts_file)]
        return Spec(name, argv, env, str(stack.root))
    raise ValueError(f"unknown service {name!r}")


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


# The servers are on this machine: never ask an HTTP proxy from the environment for them.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str, headers: Mapping[str, str] | None = None, *, method: str = "GET",
          body: object = None, timeout: float = 5) -> bytes:
    """The response body of one request (`body` sent as JSON) to a server of the stack."""
    data = None if body is None else json.dumps(body).encode()
    sent = {**({"Content-Type": "application/json"} if data is not None else {}),
            **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=sent, method=method)
    with _LOCAL.open(request, timeout=timeout) as response:
        return response.read()


def prefect_call(stack: Stack, path: str, *, method: str = "GET", body: object = None,
                 timeout: float = 10):
    """The decoded answer of the stack's Prefect API to `method path` (None if empty)."""
    raw = fetch(f"{stack.prefect_api}{path}", prefect_headers(stack), method=method,
                body=body, timeout=timeout)
    return json.loads(raw) if raw else None


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
            fetch(f"{stack.prefect_api}/health", prefect_headers(stack))
        elif name == "mlflow":
            fetch(f"{stack.mlflow_url}/health")  # unauthenticated even with basic-auth
        elif name == "alerts":
            fetch(f"{stack.alerts_url}/")
        else:
            raise ValueError(f"unknown service {name!r}")
    except Exception:  # any failure to answer is "down"; the log says why
        return False
    return True


def wait_healthy(stack: Stack, started: Mapping[str, subprocess.Popen], timeout: float) -> None:
    pending = dict(started)
    deadline = time.monotonic() + timeout
    while pending:
        for name, proc in list(pending.items()):
            log = log_path(stack.root, name)
            if proc.poll() is not None:
                raise StackError(f"{name} exited with status {proc.returncode} while "
                                 f"starting; its log, {log}, ends:\n{log_tail(log)}")
            if healthy(stack, name):
                print(f"  {name:<8} up after {time.monotonic() - deadline + timeout:.1f} s")
                del pending[name]
        if pending and time.monotonic() > deadline:
            names = ", ".join(pending)
            raise StackError(f"{names} did not answer in {timeout:.0f} s; see "
                             + ", ".join(str(log_path(stack.root, n)) for n in pending))
        if pending:
            time.sleep(0.5)


def ensure_services(stack: Stack, timeout: float) -> None:
    started = {}
    for name in stack.services():
        record = running(stack.root, name)
        wanted = service_spec(stack, name)
        if record is not None and record.get("argv") == wanted.argv and healthy(stack, name):
            print(f"  {name:<8} already running (pid {record['pid']})")
            continue
        if record is not None:
            print(f"  {stop(stack.root, name)} (not answering or other settings)")
        port = stack.ports[name]
        if not port_free(port):
            raise StackError(f"port {port} for {name} is taken by a process this stack did "
                             f"not start; stop it, or delete {stack.config_path} so that "
                             "`up` picks new ports")
        started[name] = spawn(stack.root, wanted)
        print(f"  {name:<8} starting on {HOST}:{port} (pid {started[name].pid})")
    wait_healthy(stack, started, timeout)

