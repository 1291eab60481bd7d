from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # this checkout's packages (and `tests`), whatever is installed
    sys.path.insert(0, str(REPO))

from flows.interrupts import stop_processes  # noqa: E402
from infra.procs import Supervisor, read_env_file  # noqa: E402

# The shared data every test module reads, through the fixtures below.
SHARED = REPO.parent / "shared" / "datasets"
SHARED_PARQUET = SHARED / "cifar10-jpeg" / "train.parquet"  # CIFAR-10 training set, JPEG
COMPETITION_SAMPLE = SHARED / "competition-sample" / "cifar_test_nolabel_sample.pkl"
# Settings of another stack or of the embedded defaults, which must not reach this one.
STACK_CLEARED = ["CIFAR_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
                 "PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_HOME",
                 "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "CIFAR_STATE_DIR",
                 "CIFAR_OBJECT_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "CIFAR_ALERT_WEBHOOK_URL"]
# The modules that use the local stack, in the order they run on it: the end-to-end tests
# expect a fresh registry, the others only look at their own runs.
STACK_MODULES = ["test_cluster_e2e.py", "test_stack_faults.py",
                 "test_failure_alerts_on_stack.py", "test_ui_trigger.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules on the local stack first, in STACK_MODULES order: they are the longest
    unit of work (see `pytest_xdist_make_scheduler`)."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        if "local_stack" not in getattr(item, "fixturenames", ()):
            return len(STACK_MODULES)
        if name not in STACK_MODULES:
            raise pytest.UsageError(f"{name} uses the local stack: add it to STACK_MODULES "
                                    "in tests/conftest.py, so that it runs on that stack's worker")
        return STACK_MODULES.index(name)

    items.sort(key=rank)  # stable: the order within each group is kept


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile` (the default, in pyproject.toml), with the modules on the local
    stack as one unit: each module runs whole on one worker, so its module-scoped servers
    start once, and there is one local stack, not one per worker."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModulesAndStack(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return "local-stack" if Path(module).name in STACK_MODULES else module

    return ModulesAndStack(config, log)


@pytest.fixture(scope="session")
def stack_state_dir() -> Iterator[Callable[[], Path]]:
    """New state directories for local stacks, removed at the end of the session. As root
    the stack runs PostgreSQL as the `postgres` user, which must be able to enter them:
    pytest's own base folder is private (0700, and each pytest run resets it), so these
    live beside it, enterable (0711) but not listable by others."""
    made: list[Path] = []

    def new() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="cifar-stack-")))
        made[-1].chmod(0o711)
        return made[-1]

    yield new
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def stack_browser_page(playwright, env: Mapping[str, str]):
    """A page of Debian's chromium signed in to the stack's UIs, as a user would be: the
    Prefect UI's login form keeps the auth string, base64, under `prefect-password` in
    local storage; MLflow's basic-auth app asks through the browser's own prompt."""
    browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])
    credentials = None
    if env.get("MLFLOW_TRACKING_PASSWORD"):
        credentials = {"username": env["MLFLOW_TRACKING_USERNAME"],
                       "password": env["MLFLOW_TRACKING_PASSWORD"]}
    context = browser.new_context(viewport={"width": 1400, "height": 900},
                                  http_credentials=credentials)
    if env.get("PREFECT_API_AUTH_STRING"):
        token = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
        context.add_init_script(f"localStorage.setItem('prefect-password', '{token}')")
    return browser, context.new_page()


def stack_pids(state: Path) -> dict[str, int]:
    """{program: pid} of what the stack's supervisord runs now (services and workers)."""
    return {name: info["pid"] for name, info in Supervisor(state / "stack").info().items()
            if info["pid"]}


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory,
                stack_state_dir: Callable[[], Path]) -> Iterator[dict]:
    """`python -m infra.stack up` with two CPU-slot workers on the gpu pool, for the session:
    PostgreSQL, SeaweedFS's S3, Prefect and MLflow servers, deployments from prefect.yaml.
    The competition file of its workers is the first 200 images of the shared sample."""
    from model.data import read_competition_pickle, write_competition_pickle

    state = stack_state_dir()
    env = {k: v for k, v in os.environ.items() if k not in STACK_CLEARED}
    ids, images = read_competition_pickle(COMPETITION_SAMPLE)
    competition = state / "competition-200.pkl"
    write_competition_pickle(competition, ids[:200], images[:200])
    env.update(CIFAR_COMPETITION_FILE=str(competition), CIFAR10_SOURCE=str(SHARED_PARQUET))
    cmd = [sys.executable, "-m", "infra.stack"]
    up = subprocess.run([*cmd, "up", "--state-dir", str(state), "--cpu-slots", "--workers", "2"],
                        env=env, capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield {"state": state, "env": env, "cmd": cmd,
               "client_env": read_env_file(state / "stack" / "env")}
    finally:
        subprocess.run([*cmd, "down", "--state-dir", str(state)], env=env, timeout=120)


@pytest.fixture(scope="module")
def stack(local_stack: dict) -> Iterator[dict]:
    """The session's stack, with this process pointed at it for the module: Prefect API,
    MLflow tracking URI and S3 endpoint and credentials."""
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    client_env = local_stack["client_env"]
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        for name, value in client_env.items():
            mp.setenv(name, value)
        mlflow.set_tracking_uri(client_env["MLFLOW_TRACKING_URI"])
        try:
            # A Prefect test harness started earlier in the session overrides the
            # environment; these settings take precedence over it.
            with temporary_settings(updates={PREFECT_API_URL: client_env["PREFECT_API_URL"]}):
                yield local_stack
        finally:
            mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every test that runs flows; it takes
    seconds to start, so the whole session shares it. Not autouse: tests that run no flow
    do not pay for it."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.testing.utilities import prefect_test_harness

    # Prefect configures logging at its first flow run and binds its console handler to
    # whatever sys.stderr is then; if that is a test's capsys stream, later tests log to a
    # closed file. Configure it now, against the session's stderr.
    ensure_logging_setup()
    # The server subprocess inherits the environment: no telemetry calls from a sandbox,
    # and none racing the harness's first writes to SQLite ("database is locked").
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield


# ------------------------------------------------------------------- shared data

@pytest.fixture(scope="session")
def shared_parquet() -> Path:
    """The shared JPEG Parquet copy of the 50,000 CIFAR-10 training images."""
    if not SHARED_PARQUET.is_file():
        pytest.fail(f"the shared dataset is missing: {SHARED_PARQUET}")
    return SHARED_PARQUET


@pytest.fixture(scope="session")
def competition_sample() -> Path:
    """The shared 1,000-image sample of the competition's unlabeled test file."""
    if not COMPETITION_SAMPLE.is_file():
        pytest.fail(f"the shared competition sample is missing: {COMPETITION_SAMPLE}")
    return COMPETITION_SAMPLE


# ------------------------------------------------------- servers and moto's S3

# Credentials moto accepts, and no AWS configuration of the machine's own.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    # pyarrow's S3 client would otherwise ask the EC2 metadata service for a region.
    "AWS_EC2_METADATA_DISABLED": "true",
}
AWS_CLEARED_ENV = ["AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL",
                   "AWS_ENDPOINT_URL_S3"]
# Everything tasks.settings.Settings reads, plus what mlflow.set_tracking_uri and
# mlflow.set_experiment write back into os.environ.
PIPELINE_ENV = ["CIFAR_STATE_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "CIFAR_ARTIFACT_ROOT",
                "CIFAR_OBJECT_STORE", "CIFAR10_SOURCE", "CIFAR10_CACHE_DIR",
                "CIFAR_COMPETITION_FILE"]


def free_port() -> int:
    """A port nothing listens on (right now): for servers, and for 'endpoint down' tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(name="free_port", scope="session")
def free_port_fixture() -> Callable[[], int]:
    """The `free_port` function, for test modules (they cannot import conftest)."""
    return free_port


def _stop(proc: subprocess.Popen) -> None:
    """The server and what it started (mlflow server forks uvicorn workers), stopped by
    the project's one process stopper: SIGTERM, SIGKILL what is left after 10 s."""
    import psutil

    try:
        leader = psutil.Process(proc.pid)
        family = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    stop_processes(family, 10)
    proc.wait()


Spawn = Callable[..., str]


@pytest.fixture(scope="module")
def spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawn]:
    """spawn(name, cmd, ready_url, env=None, cwd=None, timeout=30) -> ready_url, once a GET
    of it answers 2xx. Each server runs in its own process group on 127.0.0.1 and is
    stopped with its children (mlflow server forks uvicorn workers) when the module ends."""
    procs: list[subprocess.Popen] = []

    def start(
        name: str,
        cmd: Sequence[str],
        ready_url: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 30,
    ) -> str:
        log_path = tmp_path_factory.mktemp(name) / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(env) if env is not None else None, cwd=cwd,
                                    start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}: {log_path.read_text()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2):
                    return ready_url
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{name} did not answer {ready_url} in {timeout:.0f} s: "
                                f"{log_path.read_text()[-4000:]}")
                time.sleep(0.2)

    try:
        yield start
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="module")
def moto_endpoint(spawn: Spawn) -> Iterator[str]:
    """URL of a moto S3 server (real HTTP, a subprocess) for one test module, with fake
    credentials and no endpoint override in the environment for that module."""
    with pytest.MonkeyPatch.context() as mp:
        for name in AWS_CLEARED_ENV:
            mp.delenv(name, raising=False)
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        spawn("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
              f"{url}/moto-api/", timeout=30)
        yield url


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pytest.MonkeyPatch]:
    """A fresh CIFAR_STATE_DIR and no inherited pipeline or MLflow settings, for the whole
    module. MLflow's process-global tracking URI and experiment are restored at the end,
    so later tests do not write into this module's store."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_uri = tracking_utils._tracking_uri
    saved_experiment = fluent._active_experiment_id
    with pytest.MonkeyPatch.context() as mp:
        for name in PIPELINE_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("CIFAR_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        mp.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
        try:
            yield mp
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            tracking_utils._tracking_uri = saved_uri
            fluent._active_experiment_id = saved_experiment
        # Leaving the context now restores MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID.
