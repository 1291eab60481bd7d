"""Where the pipeline keeps its state, from the environment, with embedded defaults.

With nothing set, everything lives under `./.pipeline/`; on a cluster the variables
(README, Configuration) point at shared services instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from model.errors import UserError

EXPERIMENT = "cifar10-resnet"
REGISTERED_MODEL = "cifar10-resnet"
CHAMPION = "champion"  # the alias of the best version
CHAMPION_URI = f"models:/{REGISTERED_MODEL}@{CHAMPION}"


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    tracking_uri: str
    artifact_root: str
    object_store: str
    data_source: str | None
    cache_dir: Path
    competition_file: str | None = None
    metrics_flush_seconds: float = 300.0
    system_metrics: bool = True
    cuda_visible_devices: str = ""  # recorded with each run: which GPU a worker was given

    @classmethod
    def from_env(cls, state_dir: str | os.PathLike | None = None) -> Settings:
        env = os.environ
        state = Path(state_dir or env.get("CIFAR_STATE_DIR") or ".pipeline").resolve()
        return cls(
            state_dir=state,
            tracking_uri=env.get("MLFLOW_TRACKING_URI") or sqlite_uri(state / "mlflow.db"),
            artifact_root=env.get("CIFAR_ARTIFACT_ROOT") or (state / "mlartifacts").as_uri(),
            object_store=env.get("CIFAR_OBJECT_STORE") or (state / "objects").as_uri(),
            data_source=env.get("CIFAR10_SOURCE") or None,
            cache_dir=Path(env.get("CIFAR10_CACHE_DIR") or state / "cache"),
            competition_file=env.get("CIFAR_COMPETITION_FILE") or None,
            metrics_flush_seconds=float(env.get("CIFAR_METRICS_FLUSH_SECONDS") or 300),
            system_metrics=(env.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING") or "true").lower()
            not in ("false", "0"),
            cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES", ""))

    def apply(self) -> None:
        """Point MLflow at this tracking store and make sure the experiment exists there."""
        import mlflow

        self.state_dir.mkdir(parents=True, exist_ok=True)
        check_tracking_server(self.tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        # The first use of a fresh SQLite file creates MLflow's schema; two processes doing
        # that at once fail with "table ... already exists".
        with _schema_lock(self.tracking_uri):
            client = mlflow.MlflowClient()
            if client.get_experiment_by_name(EXPERIMENT) is None:
                # A local database keeps its artifacts beside it; a server decides for itself.
                location = self.artifact_root if self.tracking_uri.startswith("sqlite") else None
                try:
                    client.create_experiment(EXPERIMENT, artifact_location=location)
                except Exception:
                    # Another process created it first.
                    if client.get_experiment_by_name(EXPERIMENT) is None:
                        raise
            found = client.get_experiment_by_name(EXPERIMENT).artifact_location
            if self._embedded() and found != self.artifact_root \
                    and found.startswith("file://") and found.endswith("/mlartifacts") \
                    and (self.state_dir / "mlartifacts").is_dir():  # they came along
                _relocate(self.state_dir / "mlflow.db", found, self.artifact_root)
            mlflow.set_experiment(EXPERIMENT)

    def _embedded(self) -> bool:
        """Are MLflow's database and artifacts the state directory's own, by default?"""
        return (self.tracking_uri, self.artifact_root) == (
            sqlite_uri(self.state_dir / "mlflow.db"), (self.state_dir / "mlartifacts").as_uri())


_LOCATIONS = [("experiments", "artifact_location"), ("runs", "artifact_uri"),
              ("logged_models", "artifact_location"), ("model_versions", "storage_location")]


def _relocate(database: Path, old: str, new: str) -> None:
    """A state directory that was moved or copied: the absolute artifact locations of its
    database move to its own `mlartifacts`, so its models load and its new runs stay inside."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(database, timeout=60)) as db, db:
        for table, column in _LOCATIONS:
            db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE "
                       f"substr({column}, 1, ?) = ? AND substr({column}, ?, 1) IN ('', '/')",
                       (new, len(old) + 1, len(old), old, len(old) + 1))


def sqlite_uri(path: Path, driver: str = "sqlite") -> str:
    """A SQLAlchemy URL for the SQLite file `path`. SQLAlchemy ends the path at a `?` and
    percent-decodes it, so a directory named `a?b` or `50%` must be quoted to stay itself;
    other characters stay as they are, readable."""
    quoted = "".join(f"%{ord(c):02X}" if c in "%?#" else c for c in str(path))
    return f"{driver}:///{quoted}"


def remove_stray_sqlite_dir(tracking_uri: str) -> None:
    """MLflow creates the directory of a SQLite URI's path without decoding it: for a
    state directory named `a?b`, an empty `a%3Fb` beside it. Remove it if it is empty."""
    from sqlalchemy.engine import make_url

    if not tracking_uri.startswith("sqlite:///"):
        return
    literal = Path(tracking_uri.removeprefix("sqlite:///")).parent
    if literal != Path(make_url(tracking_uri).database or "").parent:
        with contextlib.suppress(OSError):
            literal.rmdir()


# ------------------------------------------------------------------ fast, clear failures


_FREE_SPACE = "free some space, or pass --state-dir a directory on another disk"
_WRITABLE = "make it writable, or pass --state-dir a writable directory"


class StateDirError(UserError, ValueError):
    """The state directory cannot hold the pipeline's state: a file, read-only, or full."""


def check_state_dir(state: Path, writable: bool = True) -> None:
    """Refuse in milliseconds, naming the cause, a state directory that Prefect and MLflow
    would fail on after minutes of retries: a file, unwritable (when `writable`), or full."""
    if state.exists() and not state.is_dir():
        raise StateDirError(f"the state directory {state} is a file: pass --state-dir a "
                            "directory (it is created if missing)")
    if not writable and state.is_dir():
        return
    probe = state / f".write-probe-{os.getpid()}"
    try:
        state.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:  # a write that reaches the disk, as SQLite's do
            f.write(bytes(4096))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise StateDirError("cannot use the state directory: "
                            f"{disk_error_message(exc, state) or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    need_mb = float(os.environ.get("CIFAR_MIN_FREE_MB") or 256)
    free_mb = shutil.disk_usage(state).free / 2**20
    if free_mb < need_mb:
        raise StateDirError(
            f"only {free_mb:.0f} MB free on the disk of the state directory {state}, "
            f"{need_mb:.0f} MB needed (CIFAR_MIN_FREE_MB) for the databases, checkpoints "
            f"and models: {_FREE_SPACE}")


_DISK_ERRORS = {  # errno: (the problem, what to do)
    errno.ENOSPC: ("no space left on the disk", _FREE_SPACE),
    errno.EDQUOT: ("the disk quota is exhausted", _FREE_SPACE),
    errno.EROFS: ("on a read-only filesystem", _WRITABLE),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("permission denied", _WRITABLE),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "fix the path"),
}


def disk_error_message(exc: BaseException | None, where: Path | None = None) -> str | None:
    """One line naming the disk problem behind `exc` (or an error it was raised from)
    and what to do, or None when the cause is not the disk."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            problem, advice = _DISK_ERRORS[exc.errno]
            return f"{where or exc.filename or 'a file'}: {problem}: {advice}"
        exc = exc.__cause__ or exc.__context__
    return None


def tracking_error_message(exc: BaseException | None) -> str | None:
    """One line for a tracking call that failed on the network after its bounded retries
    (a requests error that MLflow wrapped), or None when that is not the cause."""
    import requests

    from model.data.uri import redact

    while exc is not None and not isinstance(exc, requests.RequestException):
        exc = exc.__cause__ or exc.__context__
    if exc is None or not (uri := os.environ.get("MLFLOW_TRACKING_URI")):
        return None  # not a tracking server's failure
    return (f"the MLflow tracking server {redact(uri)} did not answer a request within "
            f"MLFLOW_HTTP_REQUEST_TIMEOUT ({os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT')} s) "
            f"and its retries ({type(exc).__name__}): check the server, then rerun")


def bypass_proxy_for_loopback(prefect: bool = False) -> None:
    """The embedded Prefect API and the local stack listen on 127.0.0.1; a proxy set up
    for the outside world cannot reach them, and asking it makes every call hang or fail.
    `prefect`: the command starts Prefect, whose client must support the proxy."""
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    if not any(os.environ.get(n) or os.environ.get(n.lower()) for n in names):
        return
    if prefect:
        check_socks_support()
    entries = [e.strip() for n in ("NO_PROXY", "no_proxy")
               for e in os.environ.get(n, "").split(",") if e.strip()]
    entries += [h for h in ("127.0.0.1", "localhost", "::1") if h not in entries]
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(dict.fromkeys(entries))


def check_socks_support() -> None:
    """Prefect's HTTP client builds a transport for each proxy variable as it starts; one
    for a SOCKS proxy needs the socksio package: without it, say so in one line."""
    import importlib.util

    from model.config import ConfigError
    from model.data.uri import redact

    for name in (n for b in ("ALL_PROXY", "HTTPS_PROXY", "HTTP_PROXY") for n in (b, b.lower())):
        value = os.environ.get(name, "")
        if value.lower().startswith("socks") and importlib.util.find_spec("socksio") is None:
            raise ConfigError(f"{name}={redact(value)} is a SOCKS proxy, which Prefect reaches "
                              f"only with socksio: pip install 'httpx[socks]', or unset {name}")


def check_tracking_server(uri: str) -> None:
    """Wait up to CIFAR_TRACKING_TIMEOUT_SECONDS for an HTTP tracking server to answer, then
    raise TrackingUnavailableError naming it. MLflow's own client would retry for minutes
    (120 s read timeouts, seven retries with backoff) before a raw traceback."""
    import socket
    import urllib.error
    import urllib.request

    from model.data.uri import redact
    from tasks.metrics import TrackingUnavailableError

    if not uri.startswith(("http://", "https://")):
        return
    timeout = float(os.environ.get("CIFAR_TRACKING_TIMEOUT_SECONDS") or 30)
    # Every later call too: a server that answers this probe and never its API would
    # otherwise hold one for minutes. A quarter of the budget per try, two retries 1 s
    # apart: within the budget in all. What the environment sets is kept.
    for name, value in (("TIMEOUT", max(1, int(timeout / 4))), ("MAX_RETRIES", 2),
                        ("BACKOFF_FACTOR", 1)):
        os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{name}", str(value))
    deadline = time.monotonic() + timeout
    parts = urlsplit(uri)
    # Credentials in the URL are MLflow's to send; any HTTP answer will do here (a server
    # with basic auth answers 401).
    health = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2],
                         parts.path.rstrip("/") + "/health", "", ""))
    while True:
        try:
            with urllib.request.urlopen(health, timeout=max(0.1, deadline - time.monotonic())):
                return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError | socket.timeout):
                problem = f"accepted the connection but did not answer within {timeout:g} s"
            elif time.monotonic() < deadline:
                # Refused: perhaps starting. Try again until the deadline.
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                continue
            else:
                problem = f"is unreachable ({reason})"
        raise TrackingUnavailableError(
            f"the MLflow tracking server {redact(uri)} {problem}: start it (`cifar-pipeline stack "
            "up`), fix MLFLOW_TRACKING_URI, or unset it to use the local database; "
            "CIFAR_TRACKING_TIMEOUT_SECONDS sets how long to wait")


def _schema_lock(tracking_uri: str) -> contextlib.AbstractContextManager:
    """A lock beside a SQLite tracking database; other stores need none."""
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database if tracking_uri.startswith("sqlite") else None
    if not database or database == ":memory:":
        return contextlib.nullcontext()
    return file_lock(Path(database).with_name(Path(database).name + ".lock"))


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 300.0,
              what: str = "creating a database there") -> Iterator[None]:
    """An exclusive lock between processes (flock: released if its holder dies); the one
    the local stack's `up` and `down` take too."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StateDirError(
                        f"another process has held {path} for {timeout:g} s while {what}: "
                        "stop it, or use another --state-dir") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
