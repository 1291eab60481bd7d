"""The score flow against the embedded local object store, with a registered (untrained)
light network as champion: the files it writes, its idempotence, where its outputs go, and
its refusals."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flows.score import ScoreConfig, score
from model.data import CLASSES, InvalidInputError, read_competition_pickle
from model.nets import build_model
from tasks import registry
from tasks.registry import RegistryError
from tasks.settings import REGISTERED_MODEL, Settings
from tasks.storage import LocalStore, open_store

pytestmark = pytest.mark.usefixtures("prefect_harness")

DATA_FILES = ("predictions.csv", "predictions.parquet")


def store_uri(scored: dict[str, Any], name: str) -> str:
    return f"{scored['store']}/{scored['prefix']}/{name}"


def stored_keys(store: LocalStore, prefix: str = "") -> list[str]:
    """Every key in the local store that starts with `prefix`, sorted."""
    keys = (p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    return sorted(k for k in keys if k.startswith(prefix))


@pytest.fixture(scope="module")
def state_dir(module_state: Path) -> Path:
    # One registered model and one scoring run serve every test here.
    return module_state


@pytest.fixture(scope="module")
def version(module_state: Path) -> str:
    Settings.from_env().apply()
    torch.manual_seed(0)
    with mlflow.start_run(run_name="register light for scoring"):
        mv = registry.register(build_model("light"), variant="light", tta=False,
                               tags={"recipe": "fast", "data_digest": "test-data",
                                     "val_digest": "test-val", "val_acc": "0.1"})
    registry.set_alias("champion", str(mv.version))
    return str(mv.version)


@pytest.fixture(scope="module")
def scored(prefect_harness: None, version: str, competition_sample: Path) -> dict[str, Any]:
    # tta=False halves the CPU time; the main job scores with TTA.
    return score(ScoreConfig(input_uri=str(competition_sample), tta=False))


@pytest.fixture
def store(isolated_state: Path) -> LocalStore:
    store = open_store(Settings.from_env().object_store)
    assert isinstance(store, LocalStore)
    return store


@pytest.fixture(scope="module")
def sample(competition_sample: Path) -> tuple[np.ndarray, np.ndarray]:
    return read_competition_pickle(competition_sample)


def test_csv_has_one_row_per_input_id_in_order(
    scored: dict[str, Any], store: LocalStore, sample: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, _ = sample
    lines = store.get(f"{scored['prefix']}/predictions.csv").decode().splitlines()
    assert lines[0] == "ID,Labels"
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == len(ids) == 1000
    assert all(len(row) == 2 for row in rows)
    np.testing.assert_array_equal([int(r[0]) for r in rows], ids)
    labels = np.array([int(r[1]) for r in rows])
    assert labels.min() >= 0 and labels.max() <= 9


def test_parquet_schema_and_consistency_with_the_csv(
    scored: dict[str, Any], store: LocalStore, sample: tuple[np.ndarray, np.ndarray]
) -> None:
    table = pq.read_table(io.BytesIO(store.get(f"{scored['prefix']}/predictions.parquet")))
    expected = pa.schema([("id", pa.int64()), ("label", pa.int64()), ("class_name", pa.string()),
                          *((f"prob_{name}", pa.float32()) for name in CLASSES)])
    assert table.schema.remove_metadata().equals(expected), table.schema
    assert table.num_rows == 1000
    ids, _ = sample
    np.testing.assert_array_equal(table["id"].to_numpy(), ids)
    labels = table["label"].to_numpy()
    assert table["class_name"].to_pylist() == [CLASSES[i] for i in labels]
    probs = np.stack([table[f"prob_{name}"].to_numpy() for name in CLASSES], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(axis=1), labels)
    csv = store.get(f"{scored['prefix']}/predictions.csv").decode().splitlines()[1:]
    np.testing.assert_array_equal([int(line.split(",")[1]) for line in csv], labels)


def test_manifest_names_the_model_input_and_checksums(
    scored: dict[str, Any], store: LocalStore, version: str, competition_sample: Path,
    sample: tuple[np.ndarray, np.ndarray], tracking: mlflow.MlflowClient,
) -> None:
    ids, images = sample
    input_digest = hashlib.sha256(ids.tobytes() + images.tobytes()).hexdigest()
    mv = tracking.get_model_version(REGISTERED_MODEL, version)
    # The key holds the input, the weights, the run that made them and TTA, so a rerun
    # finds it and another model (one that reuses the version number) does not.
    assert scored["prefix"] == (
        f"predictions/{REGISTERED_MODEL}-v{version}/{input_digest[:16]}-"
        f"{mv.tags['weights_sha256'][:12]}-{mv.run_id[:8]}-no-tta")
    assert not scored["reused"]
    manifest = json.loads(store.get(f"{scored['prefix']}/manifest.json"))
    assert manifest["rows"] == 1000
    assert manifest["model_name"] == REGISTERED_MODEL
    assert manifest["model_version"] == version
    assert manifest["input_digest"] == input_digest
    assert manifest["input_uri"] == str(competition_sample)
    assert manifest["model_run_id"] == mv.run_id
    assert manifest["weights_sha256"] == mv.tags["weights_sha256"]
    assert set(manifest["files"]) == set(DATA_FILES)
    for name, meta in manifest["files"].items():
        key = f"{scored['prefix']}/{name}"
        assert meta["key"] == key  # relative to the store, so the store can move
        assert scored["files"][name]["uri"] == store.uri(key)
        assert meta["sha256"] == hashlib.sha256(store.get(key)).hexdigest()
        assert meta["bytes"] == len(store.get(key))
    # Written last: a reader that sees the manifest sees complete data.
    root = Path(store.root)
    manifest_time = os.stat(root / scored["prefix"] / "manifest.json").st_mtime_ns
    for name in DATA_FILES:
        assert os.stat(root / scored["prefix"] / name).st_mtime_ns <= manifest_time
    assert stored_keys(store, scored["prefix"]) == sorted(
        f"{scored['prefix']}/{n}" for n in (*DATA_FILES, "manifest.json"))


def test_logs_a_scoring_run(
    scored: dict[str, Any], version: str, tracking: mlflow.MlflowClient
) -> None:
    (run,) = mlflow.search_runs(filter_string="tags.kind = 'scoring'", output_format="list")
    assert run.data.metrics["rows"] == 1000
    counts = sum(v for k, v in run.data.metrics.items() if k.startswith("class_count/"))
    assert counts == 1000
    assert run.data.params["model_version"] == version
    assert run.data.params["output"] == store_uri(scored, "manifest.json")


def test_publishes_a_prefect_link_to_the_predictions(scored: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        links = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["predictions"])))
    # Prefect renders a link artifact as markdown: [text](uri).
    csv_uri = store_uri(scored, "predictions.csv")
    ours = [link for link in links if f"]({csv_uri})" in link.data]
    assert len(ours) == 1, [link.data for link in links]
    assert ours[0].description.startswith("1000 rows")


def test_rerun_reuses_the_result_and_rewrites_nothing(
    scored: dict[str, Any], store: LocalStore, version: str, competition_sample: Path
) -> None:
    root = Path(store.root)
    keys = stored_keys(store)
    before = {key: os.stat(root / key).st_mtime_ns for key in keys}
    # By alias and by version number: the same model version, the same input.
    for uri in (f"models:/{REGISTERED_MODEL}@champion", f"models:/{REGISTERED_MODEL}/{version}"):
        again = score(ScoreConfig(model_uri=uri, input_uri=str(competition_sample), tta=False))
        assert again["reused"] is True
        assert again["prefix"] == scored["prefix"]
        assert again["files"] == scored["files"]
        assert again["created_at"] == scored["created_at"]
    assert stored_keys(store) == keys
    assert {key: os.stat(root / key).st_mtime_ns for key in keys} == before


class _RunsACommand:
    """Unpickling this calls os.system: what a hostile competition file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_nothing_is_written(
    version: str, store: LocalStore, tmp_path: Path
) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_RunsACommand(f"touch {control}")))
    assert control.exists()  # the payload is live: a naive reader would run it

    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(
        {b"data": _RunsACommand(f"touch {sentinel}"), b"ids": np.arange(3)}))
    keys = stored_keys(store)
    with pytest.raises(InvalidInputError, match=r"refuses to load global (posix|os)\.system"):
        score(ScoreConfig(input_uri=str(evil), output="evil-output"))
    assert not sentinel.exists()
    assert stored_keys(store, "evil-output") == []
    assert stored_keys(store) == keys


@pytest.mark.parametrize(
    ("model_uri", "named"),
    [
        (f"models:/{REGISTERED_MODEL}@nope", "'nope'"),
        ("models:/no-such-model@champion", "'no-such-model'"),
        (f"models:/{REGISTERED_MODEL}/999", "version 999"),
        ("runs:/0123/model", "runs:/0123/model"),
    ],
)
def test_unknown_model_is_a_clear_error_and_nothing_is_written(
    version: str, store: LocalStore, competition_sample: Path, model_uri: str, named: str
) -> None:
    keys = stored_keys(store)
    with pytest.raises(RegistryError) as raised:
        score(ScoreConfig(model_uri=model_uri, input_uri=str(competition_sample),
                          output="missing-model"))
    assert named in str(raised.value)
    assert stored_keys(store, "missing-model") == []
    assert stored_keys(store) == keys
