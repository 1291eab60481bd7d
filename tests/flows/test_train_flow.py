"""The train flow on a few hundred real images, one epoch, both variants, run once for
the whole module: what it leaves in the MLflow tracking store, the registry and Prefect."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from PIL import Image

from flows.train import TrainResnetsConfig, train
from model.data import CLASSES, Dataset
from tasks.settings import EXPERIMENT, REGISTERED_MODEL, Settings
from tasks.storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

RUN_KEY = "flows-test-train"
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_seconds",
                 "images_per_second")
PARAMS = {"deep": 4_697_162, "light": 2_777_674}


@pytest.fixture(scope="module")
def state_dir(module_state: Path) -> Path:
    # Every test here reads the one training run below, so they share its state directory.
    return module_state


def _config(shared_parquet: Path) -> TrainResnetsConfig:
    return TrainResnetsConfig(variants=["deep", "light"], epochs=1, batch_size=64, train_size=256,
                              val_size=128, data_source=str(shared_parquet), run_key=RUN_KEY)


@pytest.fixture(scope="module")
def trained(prefect_harness: None, module_state: Path, shared_parquet: Path) -> dict[str, Any]:
    state = train(_config(shared_parquet), return_state=True)
    assert state.is_completed(), state
    return {**state.result(), "flow_run_id": state.state_details.flow_run_id}


@pytest.fixture
def client(trained: dict[str, Any], tracking: mlflow.MlflowClient) -> mlflow.MlflowClient:
    return tracking


def _versions(client: mlflow.MlflowClient) -> dict[str, Any]:
    """variant -> ModelVersion; fails if a variant has more than one version."""
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    by_variant = {mv.tags["variant"]: mv for mv in versions}
    assert len(by_variant) == len(versions), [dict(mv.tags) for mv in versions]
    return by_variant


def test_registers_one_tagged_version_per_variant(
    trained: dict[str, Any], client: mlflow.MlflowClient, small_data: Dataset
) -> None:
    versions = _versions(client)
    assert sorted(versions) == ["deep", "light"]
    assert {f"{v}-seed0": str(mv.version) for v, mv in versions.items()} == trained["versions"]
    for variant, mv in versions.items():
        tags = mv.tags
        assert tags["recipe"] == "fast"
        assert tags["data_digest"] == small_data.digest == trained["data_digest"]
        assert tags["val_digest"] == small_data.val.digest
        assert re.fullmatch(r"[0-9a-f]{64}", tags["weights_sha256"]), tags
        assert float(tags["val_acc"]) == trained["val_acc"][f"{variant}-seed0"]
        # The version is the model logged by the variant's own MLflow run.
        assert client.get_run(mv.run_id).data.tags["variant"] == variant


def test_aliases_point_at_the_variants_and_the_better_one(
    trained: dict[str, Any], client: mlflow.MlflowClient
) -> None:
    versions = _versions(client)
    aliases = client.get_registered_model(REGISTERED_MODEL).aliases
    assert set(aliases) == {"champion", "deep", "light"}
    assert str(aliases["deep"]) == str(versions["deep"].version)
    assert str(aliases["light"]) == str(versions["light"].version)
    best = max(float(mv.tags["val_acc"]) for mv in versions.values())
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert float(champion.tags["val_acc"]) == best
    assert str(champion.version) == trained["champion"]
    # The first champion of an empty registry is always a promotion.
    assert trained["promoted"] is True


def test_child_runs_are_nested_under_the_flow_run(
    trained: dict[str, Any], client: mlflow.MlflowClient
) -> None:
    parent = client.get_run(trained["mlflow_run_id"])
    assert parent.info.experiment_id == client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert parent.data.tags["champion_version"] == trained["champion"]
    for variant, mv in _versions(client).items():
        run = client.get_run(mv.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, variant
        assert run.info.status == "FINISHED"


def test_logs_params_and_per_epoch_metrics_with_steps(
    trained: dict[str, Any], client: mlflow.MlflowClient, small_data: Dataset
) -> None:
    for variant, mv in _versions(client).items():
        run = client.get_run(mv.run_id)
        params = run.data.params
        assert params["variant"] == variant
        assert params["epochs"] == "1"
        assert params["batch_size"] == "64"
        assert params["data_digest"] == small_data.digest
        assert params["train_images"] == "256"
        assert params["val_images"] == "128"
        for key in ("git_commit", "torch_version", "cuda_version", "device_name"):
            assert params[key], key
        for key in EPOCH_METRICS:
            history = client.get_metric_history(mv.run_id, key)
            assert [m.step for m in history] == [0], (variant, key)
            assert np.isfinite(history[0].value), (variant, key)
        val_acc = client.get_metric_history(mv.run_id, "val/acc")[0].value
        assert 0.0 <= val_acc <= 1.0
        assert run.data.metrics["final/params"] == PARAMS[variant]


def test_logs_figures_summary_and_config(
    trained: dict[str, Any], client: mlflow.MlflowClient, tmp_path: Path
) -> None:
    for variant, mv in _versions(client).items():
        names = {a.path for a in client.list_artifacts(mv.run_id)}
        assert {"curves.png", "confusion_matrix.png", "confusion_matrix.json", "history.json",
                "model_summary.txt", "config.json", "packages.txt"} <= names, names
        out = Path(client.download_artifacts(mv.run_id, "", str(tmp_path / variant)))
        for png in ("curves.png", "confusion_matrix.png"):
            with Image.open(io.BytesIO((out / png).read_bytes())) as image:
                assert image.format == "PNG"
                assert image.width > 0 and image.height > 0
                image.load()  # decodes every pixel: a truncated file fails here
        config = json.loads((out / "config.json").read_text())
        assert config["variant"] == variant
        assert config["epochs"] == 1
        assert f"{PARAMS[variant]:,}" in (out / "model_summary.txt").read_text()
        # The exact package set that trained it.
        assert f"numpy=={np.__version__}" in (out / "packages.txt").read_text().splitlines()
        # Tables for the MLflow UI: the confusion matrix counts every validation image
        # once; the history has a row per epoch.
        matrix = mlflow.load_table("confusion_matrix.json", run_ids=[mv.run_id])
        assert list(matrix["true"]) == list(CLASSES)
        assert matrix[list(CLASSES)].to_numpy().shape == (10, 10)
        assert matrix[list(CLASSES)].to_numpy().sum() == 128
        history = mlflow.load_table("history.json", run_ids=[mv.run_id])
        assert list(history["epoch"]) == [0] and set(EPOCH_METRICS) <= set(history.columns)


def test_the_parent_run_summarises_the_seeds(
    trained: dict[str, Any], client: mlflow.MlflowClient
) -> None:
    metrics = client.get_run(trained["mlflow_run_id"]).data.metrics
    for variant in ("deep", "light"):
        assert metrics[f"seeds/{variant}/val/acc/n"] == 1
        assert metrics[f"seeds/{variant}/val/acc/mean"] == pytest.approx(
            trained["val_acc"][f"{variant}-seed0"])
        assert f"seeds/{variant}/val/acc/std" not in metrics  # one seed has no spread
    # One seed per variant: no interval, anywhere.
    assert not any(key.startswith("deep_minus_light/") for key in metrics)
    gaps = trained["seed_stats"]["deep_minus_light"]
    assert "val/acc" in gaps and set(gaps.values()) == {None}


def test_records_the_dataset_inputs(
    trained: dict[str, Any], client: mlflow.MlflowClient, small_data: Dataset
) -> None:
    expected = {"training": small_data.train.digest[:16],
                "validation": small_data.val.digest[:16]}
    run_ids = [trained["mlflow_run_id"], *(mv.run_id for mv in _versions(client).values())]
    for run_id in run_ids:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert inputs, run_id
        found = {}
        for dataset_input in inputs:
            tags = {t.key: t.value for t in dataset_input.tags}
            found[tags["mlflow.data.context"]] = dataset_input.dataset.digest
            assert tags["source_digest"] == small_data.digest
        assert found == expected, run_id


def test_champion_loads_as_pyfunc_and_predicts_probabilities(trained: dict[str, Any]) -> None:
    Settings.from_env().apply()
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    probabilities = np.asarray(model.predict(images))
    assert probabilities.shape == (4, 10)
    assert (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def _prefect_artifacts(flow_run_id: Any, key: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as prefect:
        return prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
        ))


def test_publishes_the_comparison_and_curves_to_prefect(
    trained: dict[str, Any], client: mlflow.MlflowClient
) -> None:
    (table,) = _prefect_artifacts(trained["flow_run_id"], "variant-comparison")
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    by_variant = {row["variant"]: row for row in rows}
    assert sorted(by_variant) == ["deep", "light"]
    for variant, row in by_variant.items():
        assert row["params"] == f"{PARAMS[variant]:,}"
        assert row["versions"] == trained["versions"][f"{variant}-seed0"]
        assert row["epochs"] == "1"
        assert float(row["val acc %"]) == pytest.approx(
            100 * trained["val_acc"][f"{variant}-seed0"], abs=0.01)

    # The curves stay in MLflow: the table links each run and its curves, copies nothing.
    (runs,) = _prefect_artifacts(trained["flow_run_id"], "training-runs")
    assert runs.type == "markdown" and "base64" not in runs.data
    for variant in ("deep", "light"):
        run_id = _versions(client)[variant].run_id
        assert f"[{run_id}](" in runs.data
        (image,) = _prefect_artifacts(trained["flow_run_id"], f"curves-{variant}-seed0")
        assert image.type == "image" and image.data.endswith(f"{run_id}/artifacts/curves.png")


def test_the_run_pages_show_progress_and_the_run_key(trained: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(trained["flow_run_id"]).name == f"train-resnets {RUN_KEY}"
    (jobs,) = _prefect_artifacts(trained["flow_run_id"], "jobs")
    assert (jobs.type, jobs.data, jobs.description) == ("progress", 100.0, "jobs done 2/2, done")
    for variant in ("deep", "light"):
        (epochs,) = _prefect_artifacts(trained["flow_run_id"], f"training-{variant}-seed0")
        assert epochs.type == "progress" and epochs.data == 100.0
        assert re.fullmatch(rf"{variant}-seed0 epoch 1/1, val acc \d+\.\d\d%, done",
                            epochs.description), epochs.description


def test_job_state_is_kept_in_object_storage(trained: dict[str, Any], shared_parquet: Path) -> None:
    """Each job's checkpoint, MLflow run and registered version, under its run key: what
    lets a retried or rerun job resume instead of starting over."""
    from tasks.training import VariantJob

    store = open_store(Settings.from_env().object_store)
    for training in _config(shared_parquet).training_configs():
        job = VariantJob(training=training, run_key=RUN_KEY)
        assert job.prefix.startswith(f"runs/{RUN_KEY}/{training.variant}-seed0-")
        for name in ("checkpoint.pt", "mlflow_run.json", "registered.json"):
            assert store.exists(f"{job.prefix}/{name}"), name
        registered = json.loads(store.get(f"{job.prefix}/registered.json"))
        assert registered["version"] == trained["versions"][f"{training.variant}-seed0"]
        run_id = json.loads(store.get(f"{job.prefix}/mlflow_run.json"))["run_id"]
        assert registered["run_id"] == run_id


def test_rerun_with_the_same_run_key_registers_nothing_new(
    trained: dict[str, Any], client: mlflow.MlflowClient, shared_parquet: Path
) -> None:
    before = {v: str(mv.version) for v, mv in _versions(client).items()}
    again = train(_config(shared_parquet))
    after = {v: str(mv.version) for v, mv in _versions(client).items()}
    assert after == before
    assert again["versions"] == trained["versions"]
    assert again["champion"] == trained["champion"]
    assert again["promoted"] is False
    aliases = client.get_registered_model(REGISTERED_MODEL).aliases
    assert str(aliases["champion"]) == trained["champion"]


def test_the_flow_form_hands_its_training_fields_to_every_job() -> None:
    from pydantic import ValidationError

    config = TrainResnetsConfig(variants=["deep", "light"], seeds=[0, 1], epochs=3, cutout=8,
                                ema=0.99, compile=False, compile_mode="reduce-overhead")
    jobs = config.training_configs()
    assert sorted((j.variant, j.seed) for j in jobs) == [
        ("deep", 0), ("deep", 1), ("light", 0), ("light", 1)]
    assert {(j.epochs, j.cutout, j.ema, j.compile, j.compile_mode) for j in jobs} == {
        (3, 8, 0.99, False, "reduce-overhead")}
    # Left unset, the recipe decides: no EMA, compiled on CUDA only.
    (default,) = TrainResnetsConfig(variants=["light"]).training_configs()
    assert default.ema == 0.0 and default.compile is None and default.compile_mode == "default"
    for bad, field in (({"ema": 1.0}, "ema"), ({"ema": float("nan")}, "ema"),
                       ({"compile_mode": "turbo"}, "compile_mode")):
        with pytest.raises(ValidationError, match=field):
            TrainResnetsConfig(**bad)
