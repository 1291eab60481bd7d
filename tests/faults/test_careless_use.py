"""Careless use that used to end slowly or unclearly: a bad `--run-key` (found after about
15 s, then repeated in the resume hint), a SOCKS proxy without its client package (an
ImportError traceback), `models` on a read-only or nearly full state directory (refused,
though it only reads), promotion-triggered scoring with no competition file (a failure
and an alert per promotion), and a tracking server that answers /health but never its
API (a command hung for 330 s)."""

from __future__ import annotations

import http.server
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flows.cli import main
from flows.config import TrainResnetsConfig
from tests.conftest import COMPETITION_SAMPLE as SAMPLE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(monkeypatch, tmp_path):
    """The process environment, restored afterwards (main() writes PREFECT_HOME and more)."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "PREFECT_", "CIFAR")) or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("key", ["../other", "a/b", "with space", "x" * 65, "-flag",
                                 "line\nbreak", ".hidden", ""])
@pytest.mark.parametrize("command", ["run", "train"])
def test_a_bad_run_key_is_refused_before_anything_starts(key, command, env, tmp_path, capsys):
    state = tmp_path / "state"
    started = time.monotonic()
    assert main(["--state-dir", str(state), command, f"--run-key={key}"]) == 1
    assert time.monotonic() - started < 1.0
    line = _one_error_line(capsys)
    assert f"--run-key {key!r} is not a run key" in line and "to resume" not in line
    assert not state.exists()  # nothing started, nothing written
    with pytest.raises(ValidationError, match="run_key"):
        TrainResnetsConfig(run_key=key)


@pytest.mark.skipif(importlib.util.find_spec("socksio") is not None,
                    reason="socksio is installed: a SOCKS proxy works")
@pytest.mark.parametrize("name", ["ALL_PROXY", "all_proxy", "HTTPS_PROXY"])
def test_a_socks_proxy_without_its_package_is_one_line(name, env, tmp_path, capsys):
    env.setenv(name, "socks5://user:hunter2@127.0.0.1:1080")
    started = time.monotonic()
    assert main(["--state-dir", str(tmp_path / "state"), "score", "--input", str(SAMPLE)]) == 1
    assert time.monotonic() - started < 2.0
    line = _one_error_line(capsys)
    assert "socksio" in line and "pip install 'httpx[socks]'" in line
    assert "socks5://***@127.0.0.1:1080" in line and "hunter2" not in line


def _models(state: Path, prefix: list[str] = (), **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MLFLOW_", "PREFECT_", "CIFAR")) and not k.lower().endswith(
                 "_proxy")}
    return subprocess.run([*prefix, sys.executable, "-m", "flows.cli", "--state-dir",
                           str(state), "models"], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_models_reads_a_read_only_or_nearly_full_state_dir(tmp_path):
    state = tmp_path / "state"
    assert _models(state).returncode == 0  # creates the database
    # Nearly full: less free space than a writing command needs.
    full = _models(state, CIFAR_MIN_FREE_MB=str(10**9))
    assert full.returncode == 0 and "no versions of cifar10-resnet" in full.stdout, full.stderr
    # Read-only. Root writes through file modes: run without the capabilities that let it.
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv(1) (util-linux) is missing")
        drop = "-dac_override,-dac_read_search"
        prefix = ["setpriv", "--bounding-set", drop, "--inh-caps", drop]
    before = sorted(p.name for p in state.iterdir())
    for path in (state / "mlflow.db", state):
        path.chmod(0o500 if path.is_dir() else 0o400)
    try:
        ro = _models(state, prefix)
    finally:
        state.chmod(0o700)
    assert ro.returncode == 0 and "no versions of cifar10-resnet" in ro.stdout, ro.stderr
    assert sorted(p.name for p in state.iterdir()) == before


def test_promotion_scoring_without_a_competition_file_is_skipped(env, tmp_path,
                                                                 prefect_harness, caplog):
    from flows.score import ScoreConfig, score

    env.setenv("CIFAR_STATE_DIR", str(tmp_path / "state"))
    trigger = next(d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())
                   ["deployments"] if d["name"] == "score-competition")["triggers"][0]
    config = ScoreConfig(**trigger["parameters"]["config"])
    assert config.skip_without_input
    with caplog.at_level(logging.INFO):
        final = score(config, return_state=True)
    assert final.is_completed()
    assert final.result() == {"skipped": "no competition file is configured"}
    assert "nothing to score" in caplog.text
    # Asked for by hand, the missing input is still a failure.
    assert score(ScoreConfig(), return_state=True).is_failed()


class _HealthOnly(http.server.BaseHTTPRequestHandler):
    """/health answers; the API takes the request and never answers."""

    def do_GET(self) -> None:
        if self.path.endswith("/health"):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")
        else:
            time.sleep(60)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def half_up_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_that_answers_health_but_not_its_api_ends_models_in_one_line(
        env, tmp_path, capsys, half_up_server):
    env.setenv("CIFAR_TRACKING_TIMEOUT_SECONDS", "4")  # 1 s per try, three tries
    env.setenv("MLFLOW_TRACKING_URI", half_up_server)
    started = time.monotonic()
    assert main(["--state-dir", str(tmp_path / "state"), "models"]) == 1
    assert time.monotonic() - started < 10
    line = _one_error_line(capsys)
    assert f"the MLflow tracking server {half_up_server} did not answer" in line
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT (1 s)" in line


def test_settings_apply_bounds_the_calls_after_the_probe(env, half_up_server):
    from mlflow.exceptions import MlflowException

    from tasks.settings import Settings

    env.setenv("CIFAR_TRACKING_TIMEOUT_SECONDS", "4")
    env.setenv("MLFLOW_TRACKING_URI", half_up_server)
    started = time.monotonic()
    with pytest.raises(MlflowException):
        Settings.from_env().apply()
    assert time.monotonic() - started < 10
