"""Children train on the data their parent resolved and decoded: the parent pins the source
and its digest in every job, whatever the child's own environment names; a child whose
data decodes to another digest fails before it trains, and is not retried."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from prefect import get_client
from prefect.settings import PREFECT_API_URL

import tasks.dispatch
from flows.train import TrainResnetsConfig, train
from flows.train_variant import train_variant_flow
from model.config import DataConfig, TrainConfig
from model.data import Dataset
from tasks.data import DataMismatchError
from tasks.settings import REGISTERED_MODEL
from tasks.training import VariantJob, VariantResult

pytestmark = pytest.mark.usefixtures("prefect_harness")

REPO = Path(__file__).resolve().parents[2]
# What a pool worker's flow run does with its parameters, in a process of its own.
CHILD = """
import json, os, sys
from flows.train_variant import train_variant_flow
from tasks.training import VariantJob
job = VariantJob.model_validate(json.load(sys.stdin))
result = train_variant_flow.with_options(retries=0)(job)
print(json.dumps({**result, "child_source": os.environ.get("CIFAR10_SOURCE")}))
"""


@pytest.mark.slow
def test_a_child_whose_environment_names_no_source_trains_on_the_parents_data(
    shared_parquet: Path, small_data: Dataset, tracking: mlflow.MlflowClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CIFAR10_SOURCE", str(shared_parquet))  # the parent's machine only
    children: list[tuple[VariantJob, str | None]] = []

    def worker_without_a_source(jobs, config, settings):
        """A pool worker elsewhere (a Kubernetes Job): a process of its own, given the job
        as the worker passes it (JSON parameters), whose environment names no data."""
        env = {k: v for k, v in os.environ.items() if k != "CIFAR10_SOURCE"}
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the test server, not a temporary one
        results = []
        for job in jobs:
            child = subprocess.run(
                [sys.executable, "-c", CHILD], input=json.dumps(job.model_dump(mode="json")),
                env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
            assert child.returncode == 0, child.stderr[-3000:]
            result = json.loads(child.stdout.strip().splitlines()[-1])
            children.append((job, result.pop("child_source")))
            results.append(VariantResult(**result))
        return results, {}

    monkeypatch.setattr(tasks.dispatch, "run_on_pool", worker_without_a_source)
    summary = train(TrainResnetsConfig(variants=["light"], epochs=1, batch_size=64,
                                       train_size=256, val_size=128, dispatch="pool"))
    ((job, child_env),) = children
    assert child_env is None
    assert job.data.data_source == shared_parquet.as_uri() and job.data_digest == small_data.digest
    (version,) = tracking.search_model_versions(f"name='{REGISTERED_MODEL}'")
    assert version.tags["data_digest"] == small_data.digest == summary["data_digest"]
    assert version.tags["val_digest"] == small_data.val.digest
    assert tracking.get_run(version.run_id).data.params["data_source"] == shared_parquet.as_uri()


def test_a_child_given_other_data_fails_naming_both_digests_and_sources(
    shared_parquet: Path, small_data: Dataset, tracking: mlflow.MlflowClient,
) -> None:
    parents = "0" * 64  # what the parent decoded: another file at the same path
    job = VariantJob(training=TrainConfig(variant="light", epochs=1),
                     data=DataConfig(data_source=str(shared_parquet), val_size=128, train_size=256),
                     data_digest=parents, run_key="other-data")
    state = train_variant_flow(job, return_state=True)
    with pytest.raises(DataMismatchError) as info:
        state.result()
    with get_client(sync_client=True) as client:  # at once: the two retries were dropped
        assert client.read_flow_run(state.state_details.flow_run_id).run_count == 1
    message = str(info.value)
    assert f"{shared_parquet} (the flow configuration) decodes here to digest {small_data.digest}" \
        in message
    assert f"the parent decoded {shared_parquet} to {parents}" in message
    # It failed before training: no MLflow run was started.
    assert tracking.search_runs([e.experiment_id for e in tracking.search_experiments()]) == []
