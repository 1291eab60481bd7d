"""The main job through its command line: `cifar-pipeline run --profile smoke` on the
shared Parquet and the shared competition sample, in a fresh state directory."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

import model.data.competition as competition_module
from flows.cli import main
from model.data import read_competition_pickle, write_competition_pickle
from tasks.settings import REGISTERED_MODEL, Settings

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.mark.slow
def test_run_smoke_ends_with_a_champion_and_predictions(
    tmp_path: Path, shared_parquet: Path, competition_sample: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = tmp_path / "job"  # nothing there yet: the embedded defaults start from scratch
    # The first 200 images of the sample: the same format, a fifth of the scoring time.
    ids, images = read_competition_pickle(competition_sample)
    competition = tmp_path / "competition-200.pkl"
    write_competition_pickle(competition, ids[:200], images[:200])
    reads, restricted_loads = [], competition_module.restricted_loads
    monkeypatch.setattr(competition_module, "restricted_loads",
                        lambda data, what: reads.append(what) or restricted_loads(data, what))
    code = main(["--state-dir", str(job), "run", "--profile", "smoke",
                 "--data", str(shared_parquet), "--competition-file", str(competition)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "profile smoke" in out
    assert reads == [str(competition)]  # checked before training, scored without a reread

    Settings.from_env(job).apply()
    assert mlflow.get_tracking_uri() == f"sqlite:///{job / 'mlflow.db'}"
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    assert sorted(mv.tags["variant"] for mv in versions) == ["deep", "light"]
    aliases = {k: str(v) for k, v in client.get_registered_model(REGISTERED_MODEL).aliases.items()}
    assert set(aliases) == {"champion", "deep", "light"}
    run = client.get_run(versions[0].run_id)
    assert run.data.params["train_images"] == "512"
    assert run.data.params["epochs"] == "1"

    # 200 predictions of the champion in the local object store under the state dir.
    (csv,) = (job / "objects").rglob("predictions.csv")
    assert csv.parent.parent.name == f"{REGISTERED_MODEL}-v{aliases['champion']}"
    lines = csv.read_text().splitlines()
    assert lines[0] == "ID,Labels"
    np.testing.assert_array_equal([int(line.split(",")[0]) for line in lines[1:]], ids[:200])
    assert {int(line.split(",")[1]) for line in lines[1:]} <= set(range(10))
    assert (csv.parent / "predictions.parquet").is_file()
    assert (csv.parent / "manifest.json").is_file()
    # The closing summary names the champion and where the predictions went.
    assert f"version {aliases['champion']}" in out
    assert csv.as_uri() in out

    assert main(["--state-dir", str(job), "models"]) == 0
    listing = capsys.readouterr().out
    rows = {line.split()[0]: line for line in listing.splitlines()[1:]}
    assert sorted(rows) == sorted(str(mv.version) for mv in versions)
    for alias, version in aliases.items():
        assert alias in rows[version]
    for mv in versions:
        assert mv.tags["variant"] in rows[str(mv.version)]
        assert mv.run_id in rows[str(mv.version)]


@pytest.mark.parametrize("content", [None, b"not a pickle", b"\x80\x04N."])
def test_score_with_a_bad_competition_file_exits_1(
    isolated_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes | None
) -> None:
    bad = tmp_path / "competition.pkl"
    if content is not None:
        bad.write_bytes(content)
    job = isolated_state
    code = main(["--state-dir", str(job), "score", "--input", str(bad)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert last.startswith("error: ")  # a message, not a traceback
    assert str(bad) in last
    # Refused before anything was written.
    assert not (job / "objects").exists() or not any(
        p.is_file() for p in (job / "objects").rglob("*"))


def test_run_with_a_missing_data_source_exits_1(
    isolated_state: Path, tmp_path: Path, competition_sample: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no-such.parquet"
    code = main(["--state-dir", str(isolated_state), "run", "--profile", "smoke",
                 "--data", str(missing), "--competition-file", str(competition_sample)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert last.startswith("error: ")
    assert str(missing) in last


def test_models_on_an_empty_registry(isolated_state: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--state-dir", str(isolated_state), "models"]) == 0
    assert f"no versions of {REGISTERED_MODEL}" in capsys.readouterr().out


def test_run_with_a_bad_competition_file_fails_before_any_training(
    isolated_state: Path, tmp_path: Path, shared_parquet: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "not-a-pickle.pkl"
    bad.write_bytes(b"ID,Labels\n1,2\n")
    code = main(["--state-dir", str(isolated_state), "run", "--profile", "smoke",
                 "--data", str(shared_parquet), "--competition-file", str(bad)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert last.startswith("error: ") and "not a valid pickle" in last
    Settings.from_env(isolated_state).apply()
    assert mlflow.MlflowClient().search_model_versions(f"name='{REGISTERED_MODEL}'") == []
