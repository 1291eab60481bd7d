"""State directories with awkward names, and --state-dir values that are not directories.

SQLAlchemy ends a SQLite URL's path at `?` and percent-decodes it: a state directory
named `run?v=1` or `100%` once put MLflow's database outside it (or failed minutes later),
and Prefect's database the same way. A --state-dir naming a file ended in a traceback.
The real-run check of such a name is the SIGTERM test of test_interrupts.py, whose
training runs in `run?v=1 100%#x`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from sqlalchemy.engine import make_url

from flows.cli import _configure_environment, main
from model.nets import build_model
from tasks import registry
from tasks.settings import Settings, remove_stray_sqlite_dir, sqlite_uri
from tasks.tracking import tracked_run

AWKWARD = ["run?v=1", "100%", "50%25", "a#b", "with space", "ünï", "x?y%z#w"]


@pytest.fixture
def env() -> Iterator[None]:
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "PREFECT_", "CIFAR")):
            del os.environ[name]
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("name", AWKWARD)
def test_sqlite_urls_name_the_file_itself(name: str, tmp_path: Path) -> None:
    path = tmp_path / name / "mlflow.db"
    for driver in ("sqlite", "sqlite+aiosqlite"):
        url = make_url(sqlite_uri(path, driver))
        assert (url.database, url.query) == (str(path), {})


def test_plain_paths_keep_their_plain_urls(tmp_path: Path) -> None:
    path = tmp_path / "state" / "mlflow.db"
    assert sqlite_uri(path) == f"sqlite:///{path}"


def test_prefect_database_stays_in_an_awkward_state_dir(env: None, tmp_path: Path) -> None:
    state = _configure_environment(str(tmp_path / "x?y%z#w"))
    url = make_url(os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    assert url.database == str(state / "prefect" / "prefect.db")


def test_an_awkward_state_dir_holds_its_runs_and_models(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's database and artifacts are created in the directory itself; a model is
    registered there and loads back, checksum checked."""
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    awkward = state.parent / "run?v=1 100%#x"
    settings = Settings.from_env(awkward)
    settings.apply()
    torch.manual_seed(0)
    with tracked_run() as run:
        version = registry.register(build_model("light"), variant="light",
                                    tags={"val_acc": "0.1"}, tta=False)
    loaded = registry.load(f"models:/{registry.REGISTERED_MODEL}/{version.version}")
    assert loaded.run_id == run.info.run_id
    assert mlflow.MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"
    assert (awkward / "mlflow.db").is_file()
    assert list((awkward / "mlartifacts").rglob("weights.pt"))
    remove_stray_sqlite_dir(settings.tracking_uri)  # what MLflow creates beside it
    assert sorted(p.name for p in state.parent.iterdir()) == [awkward.name]


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_a_state_dir_that_is_not_a_directory_is_one_clear_error(
    where: str, env: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("not a directory")
    state = afile if where == "file" else afile / "state"
    assert main(["--state-dir", str(state), "models"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert str(state) in err[0]
    assert ("is a file: pass --state-dir a directory" if where == "file"
            else "a part of the path is a file") in err[0]
    assert afile.read_text() == "not a directory"


def _open(state: Path) -> Settings:
    """The settings a new process would take for `state` (MLflow keeps the last tracking
    URI and experiment it was given in os.environ)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        os.environ.pop(name, None)
    settings = Settings.from_env(state)
    settings.apply()
    return settings


def _register(state: Path) -> str:
    _open(state)
    with tracked_run():
        return str(registry.register(build_model("light"), variant="light",
                                     tags={"val_acc": "0.1"}, tta=False).version)


def _weights(state: Path) -> list[Path]:
    return sorted((state / "mlartifacts").rglob("weights.pt"))


def test_a_moved_or_copied_state_dir_loads_its_models_and_keeps_new_ones_inside(
    state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """MLflow's database holds absolute artifact locations. A moved directory's models load
    from where it is now, and neither a new training there nor one in a copy writes outside
    the directory it runs in (once, a copy registered its new models into the original)."""
    import shutil

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    original, moved, copied = (state.parent / n for n in ("original", "moved", "copied"))
    first = _register(original)
    shutil.move(original, moved)
    _open(moved)
    assert registry.load(f"models:/{registry.REGISTERED_MODEL}/{first}").version == first
    shutil.copytree(moved, copied)
    second = _register(copied)
    assert registry.load(f"models:/{registry.REGISTERED_MODEL}/{second}").version == second
    assert len(_weights(copied)) == 2 and len(_weights(moved)) == 1
    assert not original.exists()  # not recreated by the later runs

    # A version whose files are gone: one error line naming it, from the command line.
    from urllib.request import url2pathname

    from PIL import Image

    location = mlflow.MlflowClient().get_model_version_download_uri(
        registry.REGISTERED_MODEL, first)
    assert location.startswith((copied / "mlartifacts").as_uri())
    shutil.rmtree(url2pathname(location.removeprefix("file://")))
    image = state.parent / "cat.png"
    Image.new("RGB", (32, 32), (200, 120, 40)).save(image)
    capsys.readouterr()
    predict = ["--state-dir", str(copied), "predict", str(image), "--model-uri"]
    assert main([*predict, f"models:/{registry.REGISTERED_MODEL}/{first}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"{registry.REGISTERED_MODEL} version {first}: its files at {location}" in err[0]
    assert err[0].endswith("cannot be read (weights.pt is missing)")
    assert main([*predict, f"models:/{registry.REGISTERED_MODEL}/{second}"]) == 0
