"""Machine-readable output and terminal progress, through the command line on one small
training: every `--json` document has the keys of its README example, a pseudo-terminal
sees the progress bar, a pipe sees none, and `--json` keeps stdout one JSON document."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from model.data import read_competition_pickle, write_competition_pickle

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

REPO = Path(__file__).resolve().parents[2]
BAR = "━"  # rich's bar
OPAQUE = {"seed_stats", "files"}  # keyed by variant or file name: only their presence counts


def readme_examples() -> dict[str, dict]:
    """command -> the JSON example under "`cifar-pipeline COMMAND ... --json`:" in the README."""
    text = (REPO / "README.md").read_text()
    found = re.findall(r"`cifar-pipeline (\w+)[^`\n]*--json[^`\n]*`:\n\n```json\n(.*?)\n```",
                       text, re.S)
    return {command: json.loads(example) for command, example in found}


def assert_same_keys(actual, documented, where: str = "") -> None:
    """Every object has exactly the documented keys, recursively (first list items)."""
    if isinstance(documented, dict) and isinstance(actual, dict):
        assert set(actual) == set(documented), where
        for key in set(documented) - OPAQUE:
            assert_same_keys(actual[key], documented[key], f"{where}.{key}")
    elif isinstance(documented, list) and isinstance(actual, list) and actual and documented:
        assert_same_keys(actual[0], documented[0], f"{where}[0]")


def strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def state_dir(module_state: Path) -> Path:
    return module_state


def run_cli(*args: str) -> str:
    """stdout of the command, which must succeed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*args])
    assert code == 0, out.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def outputs(module_state: Path, shared_parquet: Path, competition_sample: Path,
            tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("json")
    ids, images = read_competition_pickle(competition_sample)
    competition = folder / "competition-50.pkl"
    write_competition_pickle(competition, ids[:50], images[:50])
    state = ["--state-dir", str(module_state)]
    small = ["--data", str(shared_parquet), "--variants", "light"]
    return {
        "train": run_cli("train", *state, *small, "--epochs", "1", "--train-size", "256",
                         "--val-size", "128", "--batch-size", "64", "--json"),
        "run": run_cli("run", *state, *small, "--profile", "smoke", "--competition-file",
                       str(competition), "--json"),
        "score": run_cli("score", *state, "--input", str(competition), "--json"),
        "models": run_cli("models", *state, "--compare", "--json"),
    }


@pytest.mark.parametrize("command", ["train", "run", "score", "models"])
def test_json_output_has_the_documented_keys(outputs: dict[str, str], command: str) -> None:
    documented = readme_examples()[command]
    actual = strict_json(outputs[command])  # the whole of stdout: nothing else printed
    assert_same_keys(actual, documented, command)


def test_json_values_say_what_was_done(outputs: dict[str, str]) -> None:
    train, run = strict_json(outputs["train"]), strict_json(outputs["run"])
    assert [j["job"] for j in train["jobs"]] == ["light-seed0"]
    assert train["predictions"] is None and 0 <= train["jobs"][0]["val_acc"] <= 1
    assert run["predictions"]["csv"].endswith("predictions.csv")
    models = strict_json(outputs["models"])
    versions = {v["version"]: v for v in models["versions"]}
    assert {train["jobs"][0]["version"], run["jobs"][0]["version"]} <= set(versions)
    assert "champion" in versions[run["champion"]["version"]]["aliases"]
    score = strict_json(outputs["score"])
    assert score["rows"] == 50 and score["model_version"] == run["champion"]["version"]


@pytest.fixture
def png(tmp_path: Path) -> Path:
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(path)
    return path


def _predict(png: Path, state: Path, *, tty: str, json_out: bool = False):
    """`predict` in a child process; `tty` names the streams given a pseudo-terminal.
    Returns (what the terminal showed, stdout, stderr), the pipes' text where piped."""
    import pty

    master, slave = pty.openpty()
    streams = {name: slave if name in tty else subprocess.PIPE for name in ("stdout", "stderr")}
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "predict", str(png), "--state-dir", str(state),
         *(["--json"] if json_out else [])], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        **streams)
    os.close(slave)
    seen = b""
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while chunk := os.read(master, 4096):
            seen += chunk
    out, err = proc.communicate(timeout=120)
    os.close(master)
    assert proc.returncode == 0, (seen, err)
    return seen.decode(errors="replace"), (out or b"").decode(), (err or b"").decode()


def test_a_terminal_sees_the_bar_and_a_pipe_none(outputs, png: Path, module_state: Path):
    seen, _, _ = _predict(png, module_state, tty="stdout stderr")
    assert BAR in seen and "predicting" in seen, seen
    _, out, err = _predict(png, module_state, tty="")
    assert BAR not in out + err and "predicting" not in out + err
    assert "a.png" in out  # the table, as before


def test_with_json_the_bar_stays_off_stdout(outputs, png: Path, module_state: Path):
    seen, out, _ = _predict(png, module_state, tty="stderr", json_out=True)
    assert BAR in seen  # the terminal on stderr shows it
    assert strict_json(out)["predictions"][0]["file"] == str(png)
