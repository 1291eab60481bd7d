"""Scoring never serves another model's stored predictions, and its outputs go where they
are asked to.

Two tracking databases share one object store, and each registers its own `light`
network as version 1 (what a reset registry, or a new database pointed at an old bucket,
does): version numbers repeat, weights and runs do not. Nothing trains; every network is
an untrained one with its own seed, so each predicts differently.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from flows.score import ScoreConfig, score
from model.data import write_competition_pickle
from model.nets import build_model
from tasks import registry
from tasks.scoring import ResultMismatchError
from tasks.settings import REGISTERED_MODEL, Settings
from tasks.storage import StorageError

pytestmark = pytest.mark.usefixtures("prefect_harness")

VERSION_1 = f"models:/{REGISTERED_MODEL}/1"


@dataclass(frozen=True)
class Registries:
    root: Path
    objects: Path  # the object store both registries write to
    input_path: Path
    use: Callable[..., None]  # use(state_dir, shared_store=True): point the pipeline there
    a: Path  # state directory of the first registry
    b: Path  # ... of the second, created empty after the first one's version 1

    def config(self, output: str = "predictions") -> ScoreConfig:
        return ScoreConfig(model_uri=VERSION_1, input_uri=str(self.input_path), output=output,
                           tta=False)


def _register_light(seed: int) -> mlflow.entities.model_registry.ModelVersion:
    torch.manual_seed(seed)
    with mlflow.start_run():
        return registry.register(build_model("light"), variant="light", tta=False,
                                 tags={"val_acc": "0.1", "data_digest": f"data-{seed}",
                                       "val_digest": "v", "recipe": "fast"})


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory,
               pipeline_env: pytest.MonkeyPatch) -> Registries:
    root = tmp_path_factory.mktemp("registries")
    objects = root / "objects"

    def use(state: Path, shared_store: bool = True) -> None:
        pipeline_env.setenv("CIFAR_STATE_DIR", str(state))
        pipeline_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{state / 'mlflow.db'}")
        pipeline_env.setenv("CIFAR_ARTIFACT_ROOT", (state / "mlartifacts").as_uri())
        if shared_store:
            pipeline_env.setenv("CIFAR_OBJECT_STORE", objects.as_uri())
        else:
            pipeline_env.delenv("CIFAR_OBJECT_STORE", raising=False)
        for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            pipeline_env.delenv(name, raising=False)
        Settings.from_env().apply()

    a, b = root / "a", root / "b"
    use(a)
    b.mkdir()
    shutil.copyfile(a / "mlflow.db", b / "mlflow.db")  # empty: migrating another takes long
    assert str(_register_light(seed=0).version) == "1"
    use(b)
    assert str(_register_light(seed=1).version) == "1"

    rng = np.random.default_rng(0)
    input_path = root / "competition.pkl"
    write_competition_pickle(input_path, np.arange(50, dtype=np.int64),
                             rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8))
    return Registries(root, objects, input_path, use, a, b)


def _identity(registries: Registries, state: Path) -> tuple[str, str]:
    """(run id, weights sha256) of version 1 in the registry of `state`."""
    registries.use(state)
    mv = mlflow.MlflowClient().get_model_version(REGISTERED_MODEL, "1")
    return mv.run_id, mv.tags["weights_sha256"]


def test_a_new_version_1_is_not_served_the_old_version_1s_predictions(
    registries: Registries,
) -> None:
    identity_a = _identity(registries, registries.a)
    identity_b = _identity(registries, registries.b)
    assert identity_a != identity_b

    registries.use(registries.a)
    first = score(registries.config())
    registries.use(registries.b)
    second = score(registries.config())

    assert first["model_version"] == second["model_version"] == "1"
    assert second["reused"] is False
    assert second["prefix"] != first["prefix"]
    assert (second["model_run_id"], second["weights_sha256"]) == identity_b
    assert (first["model_run_id"], first["weights_sha256"]) == identity_a
    # Each result holds its own model's predictions.
    parquet = {r["prefix"]: r["files"]["predictions.parquet"]["sha256"] for r in (first, second)}
    assert len(set(parquet.values())) == 2
    assert second["dataset_digest"] == "data-1"

    # Each registry's version 1 finds its own result again, and only its own.
    for state, expected in ((registries.a, first), (registries.b, second)):
        registries.use(state)
        again = score(registries.config())
        assert again["reused"] is True
        assert again["prefix"] == expected["prefix"]
        assert again["created_at"] == expected["created_at"]


def test_a_stored_manifest_of_another_model_is_refused_not_reported(
    registries: Registries,
) -> None:
    registries.use(registries.b)
    scored = score(registries.config("tampered"))
    manifest_path = registries.objects / scored["prefix"] / "manifest.json"
    for field, value in (("model_run_id", "0" * 32), ("weights_sha256", "f" * 64)):
        manifest = json.loads(manifest_path.read_text())
        original = manifest[field]
        manifest[field] = value
        manifest_path.write_text(json.dumps(manifest))
        stored = manifest_path.read_bytes()

        with pytest.raises(ResultMismatchError) as raised:
            score(registries.config("tampered"))

        message = str(raised.value)
        assert f"is not {REGISTERED_MODEL} version 1's predictions" in message
        assert f"{field} {value!r} (expected {original!r})" in message
        assert "\n" not in message
        assert isinstance(raised.value, StorageError)  # the CLI prints it as `error: ...`
        assert manifest_path.read_bytes() == stored  # neither overwritten nor removed
        manifest[field] = original
        manifest_path.write_text(json.dumps(manifest))


def test_results_survive_moving_the_state_directory(registries: Registries) -> None:
    """A state directory holding the registry and the default object store is scored
    into, then moved: the result is found there, and reported at its new place."""
    before = registries.root / "before-move"
    before.mkdir()
    shutil.copyfile(registries.a / "mlflow.db", before / "mlflow.db")
    registries.use(before, shared_store=False)
    scored = score(registries.config())
    assert scored["store"] == (before / "objects").as_uri()
    manifest_bytes = (before / "objects" / scored["prefix"] / "manifest.json").read_bytes()
    assert str(before).encode() not in manifest_bytes

    after = registries.root / "after-move"
    before.rename(after)
    registries.use(after, shared_store=False)
    again = score(registries.config())

    assert again["reused"] is True
    assert again["created_at"] == scored["created_at"]
    assert again["manifest_uri"] == (after / "objects" / scored["prefix"] /
                                     "manifest.json").as_uri()
    for name, entry in again["files"].items():
        assert entry["uri"] == (after / "objects" / entry["key"]).as_uri()
        assert (after / "objects" / entry["key"]).is_file(), name


def test_an_absolute_output_is_that_directory_and_a_relative_one_a_key_prefix(
    registries: Registries,
) -> None:
    registries.use(registries.a)
    directory = registries.root / "an absolute output"

    absolute = score(registries.config(str(directory)))

    assert absolute["store"] == directory.as_uri()
    assert absolute["prefix"].startswith(f"{REGISTERED_MODEL}-v1/")
    for entry in absolute["files"].values():
        assert (directory / entry["key"]).is_file()
    # Nothing landed in the configured store under the directory's name.
    assert not list(registries.objects.rglob("an absolute output"))

    relative = score(registries.config("relative/out/"))
    assert relative["store"] == registries.objects.as_uri()
    assert relative["prefix"].startswith(f"relative/out/{REGISTERED_MODEL}-v1/")
    assert (registries.objects / relative["prefix"] / "manifest.json").is_file()


@pytest.mark.parametrize(("output", "named"), [
    ("../outside", "not a usable key prefix"),
    ("./here", "not a usable key prefix"),
    ("a//b", "not a usable key prefix"),
    ("", "not a usable key prefix"),
    ("gs://bucket/x", "unsupported storage URI"),
    ("s3://", "names no bucket"),
    ("file://relative/dir", "not an absolute file URI"),
])
def test_unusable_outputs_are_refused_by_the_form(output: str, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        ScoreConfig(output=output)
