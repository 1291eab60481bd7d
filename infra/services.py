"""The local stack's services: its settings (ports, S3 endpoint, auth, kept in
`<state>/stack/stack.json`), credentials, environments, and the service table (SERVICES):
how each server runs under supervisord and how it is checked.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import sys
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from infra import postgres
from infra.procs import Program, StackError, tool, write_text
from tasks.settings import sqlite_uri

HOST = "127.0.0.1"  # every service binds here: nothing is reachable from other machines
REPO = Path(__file__).resolve().parents[1]
ARTIFACT_BUCKET = "cifar-mlflow"
OBJECT_BUCKET = "cifar-pipeline"
HEALTH_TIMEOUT = 180.0  # seconds for all services to answer; Prefect's first start migrates
# pyarrow would ask EC2 for a region without these.
S3_ENV = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
MLFLOW_USER = "admin"
PREFECT_USER = "admin"
# SeaweedFS listens on an HTTP and a gRPC port per part; all of them get free ports.
S3_PORTS = ("s3", "s3-grpc", "s3-master", "s3-master-grpc", "s3-volume", "s3-volume-grpc",
            "s3-filer", "s3-filer-grpc")
PORTS = ("postgres", *S3_PORTS, "prefect", "mlflow", "alerts")


@dataclass
class Stack:
    """What `up` decided once and later commands reuse: ports, S3 endpoint, auth."""

    root: Path  # <state>/stack
    ports: dict[str, int]
    s3_external: str | None  # an endpoint of the user's; None: SeaweedFS on ports["s3"]
    auth: bool

    @property
    def state_dir(self) -> Path:
        return self.root.parent

    @property
    def s3_endpoint(self) -> str:
        return self.s3_external or f"http://{HOST}:{self.ports['s3']}"

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

    def stages(self) -> list[list[str]]:
        """The services in the order they start: the databases first, then their users."""
        return [["postgres"] + (["s3"] if self.s3_external is None else []),
                ["prefect", "mlflow", "alerts"]]

    def save(self) -> None:
        body = {"host": HOST, "ports": self.ports, "s3_external_endpoint": self.s3_external,
                "auth": self.auth}
        write_text(self.root / "stack.json", json.dumps(body, indent=2) + "\n")

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


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing uses now, below the range the kernel takes outgoing
    connections' own ports from: a port in it can be taken as one (and held a minute in
    TIME_WAIT) while its server is down, and `up` could not start it again."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; macOS's range begins higher
    candidates = secrets.SystemRandom().sample(range(10000, max(low, 10000 + 9 * count)),
                                               8 * count)
    chosen = [port for port in candidates if port_free(port)][:count]
    if len(chosen) < count:
        raise StackError(f"{count} free ports below {low} are needed; {len(chosen)} found")
    return chosen


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def secrets_for(stack: Stack) -> dict[str, str]:
    """Credentials generated on the first `up` and kept (0600) for later ones: the
    database, the S3 identity and the MLflow admin user keep the first ones they got."""
    path = stack.root / "secrets.json"
    values = json.loads(path.read_text()) if path.exists() else {}
    new = {"s3_access_key_id": f"STACK{secrets.token_hex(8).upper()}",
           "s3_secret_access_key": secrets.token_urlsafe(30),
           "postgres_password": secrets.token_urlsafe(24),
           "mlflow_admin_password": secrets.token_urlsafe(24),
           "mlflow_flask_secret_key": secrets.token_urlsafe(32),
           "prefect_api_auth_string": f"{PREFECT_USER}:{secrets.token_urlsafe(24)}"}
    missing = {k: v for k, v in new.items() if k not in values}
    if missing:
        values.update(missing)
        write_text(path, json.dumps(values, indent=2) + "\n", mode=0o600)
    return values


def s3_env(stack: Stack) -> dict[str, str]:
    """What clients of the stack's S3 server are given: its region and credentials."""
    secret = secrets_for(stack)
    return {**S3_ENV, "AWS_ACCESS_KEY_ID": secret["s3_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": secret["s3_secret_access_key"]}


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
        env.update(s3_env(stack))
    if stack.auth:
        secret = secrets_for(stack)
        env["PREFECT_API_AUTH_STRING"] = secret["prefect_api_auth_string"]
        env["MLFLOW_TRACKING_USERNAME"] = MLFLOW_USER
        env["MLFLOW_TRACKING_PASSWORD"] = secret["mlflow_admin_password"]
    return env


def _base_env() -> dict[str, str]:
    # Telemetry off, as Prefect's analytics are: nothing leaves this machine.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    # Settings of another Prefect API or MLflow server must not leak into this stack.
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING",
                 "PREFECT_PROFILE", "PREFECT_SERVER_API_AUTH_STRING",
                 "PREFECT_API_DATABASE_CONNECTION_URL",
                 "PREFECT_SERVER_DATABASE_CONNECTION_URL", "MLFLOW_TRACKING_URI",
                 "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                 "PGPASSWORD", "PGUSER", "PGHOST", "PGPORT", "PGDATABASE"):
        env.pop(name, None)
    return env


def tool_env(stack: Stack) -> dict[str, str]:
    """The environment of the prefect CLI calls and the workers."""
    env = _base_env()
    env["PREFECT_HOME"] = str(stack.root / "prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.update(client_env(stack))
    env["CIFAR10_CACHE_DIR"] = str(stack.state_dir / "cache")
    return env


def _s3_program(stack: Stack) -> Program:
    """SeaweedFS: master, volume server, filer and S3 gateway in one process, its data
    (objects and the filer's metadata) under <state>/stack/s3."""
    secret = secrets_for(stack)
    identity = {"identities": [{
        "name": "stack",
        "credentials": [{"accessKey": secret["s3_access_key_id"],
                         "secretKey": secret["s3_secret_access_key"]}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}
    config = stack.root / "s3-identities.json"
    write_text(config, json.dumps(identity, indent=2) + "\n", mode=0o600)
    data = stack.root / "s3"
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    p = stack.ports
    argv = [tool("weed"), "server", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={p['s3-master']}", f"-master.port.grpc={p['s3-master-grpc']}",
            f"-volume.port={p['s3-volume']}", f"-volume.port.grpc={p['s3-volume-grpc']}",
            f"-filer.port={p['s3-filer']}", f"-filer.port.grpc={p['s3-filer-grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3-grpc']}",
            f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            # Volumes of 512 MB, as many as the disk holds, instead of 8 of 30 GB.
            "-master.volumeSizeLimitMB=512", "-volume.max=0"]
    return Program("s3", argv, _base_env(), str(stack.root))


def _prefect_program(stack: Stack) -> Program:
    home = stack.root / "prefect"
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    password = secrets_for(stack)["postgres_password"]
    env = _base_env()
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=postgres.url(
            stack, "prefect", "postgresql+asyncpg", password=quote(password, safe="")),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The UI's browser code calls this URL; its default is port 4200.
        PREFECT_UI_API_URL=stack.prefect_api,
        # Links in automation messages (`flow_run|ui_url`); none without it.
        PREFECT_UI_URL=stack.prefect_url,
    )
    if stack.auth:
        env["PREFECT_SERVER_API_AUTH_STRING"] = secrets_for(stack)["prefect_api_auth_string"]
    # What `prefect server start` runs, with the Host check of `prefect_app` around it.
    argv = [sys.executable, "-m", "uvicorn", "--factory", "infra.services:prefect_app",
            "--app-dir", str(REPO), "--host", HOST, "--port", str(stack.ports["prefect"])]
    return Program("prefect", argv, env, str(stack.root))


def prefect_app():
    """Prefect's server (API, UI and its services), refusing any Host header but this
    machine's own names: a web page cannot reach it through DNS rebinding."""
    from prefect.server.api.server import create_app
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = create_app(final=True)
    # The server's own services (automations' actions) call it in-process by that last name.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost",
                                                             "prefect-in-memory"])
    return app


def _mlflow_program(stack: Stack) -> Program:
    secret = secrets_for(stack)
    env = _base_env()
    env.update(
        MLFLOW_S3_ENDPOINT_URL=stack.s3_endpoint,
        PGPASSWORD=secret["postgres_password"],  # libpq's; kept out of the command line
        # The job runner (huey consumers for GenAI jobs) is not used by this project.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    if stack.s3_external is None:
        env.update(s3_env(stack))
    # MLflow's own setting: its default of 4 workers, but not more than the cores here.
    env.setdefault("MLFLOW_WORKERS", str(min(4, os.cpu_count() or 1)))
    port = stack.ports["mlflow"]
    argv = [tool("mlflow"), "server", "--host", HOST, "--port", str(port),
            "--allowed-hosts", f"{HOST},{HOST}:{port},localhost,localhost:{port}",
            "--backend-store-uri", postgres.url(stack, "mlflow", "postgresql"),
            "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/artifacts"]
    if stack.auth:
        auth_config = stack.root / "mlflow-auth.ini"
        write_text(auth_config, "\n".join([
            "[mlflow]",
            "default_permission = READ",
            f"database_uri = {sqlite_uri(stack.root / 'mlflow-auth.db')}",
            f"admin_username = {MLFLOW_USER}",
            f"admin_password = {secret['mlflow_admin_password']}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            "",
        ]), mode=0o600)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret["mlflow_flask_secret_key"]
        argv += ["--app-name", "basic-auth"]
    return Program("mlflow", argv, env, str(stack.root), fresh=True)


def _alerts_program(stack: Stack) -> Program:
    argv = [sys.executable, "-m", "infra.alerts", "serve", "--host", HOST, "--port",
            str(stack.ports["alerts"]), "--out", str(stack.root / "alerts.jsonl")]
    return Program("alerts", argv, _base_env(), str(REPO))


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


def prefect_api(api_url: str, headers: Mapping[str, str]) -> Callable[..., object]:
    """api(path, method=, body=): the decoded answer of a Prefect API (None when empty)."""
    def call(path: str, *, method: str = "GET", body: object = None, timeout: float = 15):
        raw = fetch(f"{api_url.rstrip('/')}{path}", headers, method=method, body=body,
                    timeout=timeout)
        return json.loads(raw) if raw else None

    return call


def prefect_headers(auth_string: str | None, api_key: str | None = None) -> dict[str, str]:
    """The Authorization a Prefect client sends: Basic with an auth string, else Bearer."""
    if auth_string:
        return {"Authorization": f"Basic {base64.b64encode(auth_string.encode()).decode()}"}
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def prefect_call(stack: Stack, path: str, **kwargs):
    """The stack's Prefect API, with its credentials: see prefect_api."""
    auth = secrets_for(stack)["prefect_api_auth_string"] if stack.auth else None
    return prefect_api(stack.prefect_api, prefect_headers(auth))(path, **kwargs)


def s3_client(stack: Stack):
    import boto3
    from botocore.config import Config

    options = {}
    if stack.s3_external is None:
        env = s3_env(stack)
        options = {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                   "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1})
    return boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name=region,
                        config=config, **options)


# ------------------------------------------------------------------- the service table


@dataclass(frozen=True)
class Service:
    name: str
    url: Callable[[Stack], str]
    program: Callable[[Stack], Program]
    check: Callable[[Stack], object]  # raises unless the service answers


SERVICES = {s.name: s for s in [
    Service("postgres", lambda st: f"postgresql://{HOST}:{st.ports['postgres']}",
            postgres.program,
            lambda st: postgres.connect(st, secrets_for(st)["postgres_password"]).close()),
    Service("s3", lambda st: st.s3_endpoint, _s3_program,
            lambda st: s3_client(st).list_buckets()),
    Service("prefect", lambda st: st.prefect_url, _prefect_program,
            lambda st: prefect_call(st, "/health", timeout=5)),
    # /health answers without credentials even with basic-auth.
    Service("mlflow", lambda st: st.mlflow_url, _mlflow_program,
            lambda st: fetch(f"{st.mlflow_url}/health")),
    Service("alerts", lambda st: st.alerts_url, _alerts_program,
            lambda st: fetch(f"{st.alerts_url}/")),
]}


def healthy(stack: Stack, name: str) -> bool:
    """Does the service answer its health check right now?"""
    try:
        SERVICES[name].check(stack)
    except Exception:  # any failure to answer is "down"; the log says why
        return False
    return True
