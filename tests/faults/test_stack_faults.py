"""Faults on the local stack (PostgreSQL, SeaweedFS's S3, Prefect and MLflow servers, two
process workers on the `gpu` pool), shared with tests/integration/test_cluster_e2e.py, which
runs first.

- The Prefect and MLflow servers are killed (SIGKILL) while a training run is under way:
  supervisord restarts both by itself, the run still ends Completed with the right state
  history, and the same workers take new work.
- 60 flow-run creations and 60 reads from 12 threads while a training runs: no 5xx.
- Load: smoke-profile trainings and scorings submitted at once all complete, with nothing
  lost or duplicated in the registry or the bucket (infra/loadtest.py; the suite runs a
  smaller load than the README's figures (10 + 25, 40 + 100) to stay within its budget).
- After all that, no credential of the stack is in MLflow (params, tags, artifacts), in the
  bucket, or in Prefect (logs, parameters, pools, deployments).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest

from tests.conftest import COMPETITION_SAMPLE as SAMPLE
from tests.conftest import SHARED_PARQUET as PARQUET
from tests.conftest import stack_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The README's figures come from `python -m infra.loadtest` at 10 + 25 and 40 + 100; the
# suite checks the same invariants at a scale that fits its time budget: more runs than
# the stack's two workers, so that they queue. (Concurrent trainings registering at once:
# test_cluster_e2e.py.)
LOAD_TRAININGS = int(os.environ.get("CIFAR_TEST_LOAD_TRAININGS", "1"))
LOAD_SCORINGS = int(os.environ.get("CIFAR_TEST_LOAD_SCORINGS", "3"))


def _prefect():
    from prefect import get_client

    return get_client(sync_client=True)


def _wait_final(client, flow_run_id, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            run = client.read_flow_run(flow_run_id)
        except Exception:  # the server is restarting
            time.sleep(1)
            continue
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not finish within {timeout} s")


def _kill_and_wait_restart(state: Path, name: str) -> None:
    """SIGKILL a service's main process, as a crash would; supervisord must start a new one
    within 10 s."""
    pid = stack_pids(state)[name]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    while stack_pids(state).get(name) in (None, pid):
        assert time.monotonic() - killed < 10, f"{name} was not restarted within 10 s"
        time.sleep(0.2)


def test_killed_servers_mid_run_come_back_by_themselves_and_the_run_completes(stack):
    from prefect.deployments import run_deployment

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    workers_before = {n: p for n, p in stack_pids(stack["state"]).items()
                      if n.startswith("worker.")}
    job = {"training": {"recipe": "fast", "variant": "light", "epochs": 3, "batch_size": 32,
                        "seed": 11, "checkpoint_seconds": 0},
           "data": {"data_source": str(PARQUET), "val_size": 64, "train_size": 128},
           "run_key": "prefect-restart"}
    run = run_deployment("train-variant/train-variant", parameters={"job": job}, timeout=0)

    # Wait until training is under way: its first checkpoint is in S3.
    deadline = time.monotonic() + 300
    while not any(o["Key"].endswith(".pt") for o in s3.list_objects_v2(
            Bucket="cifar-pipeline", Prefix="objects/runs/prefect-restart/").get("Contents", [])):
        assert time.monotonic() < deadline, "the run never checkpointed"
        time.sleep(0.5)
    _kill_and_wait_restart(stack["state"], "prefect")
    _kill_and_wait_restart(stack["state"], "mlflow")
    restarted = time.time()

    with _prefect() as client:
        done = _wait_final(client, run.id)
        history = [s.type.value for s in client.read_flow_run_states(run.id)]
    assert done.state.is_completed(), done.state.message
    assert history[-2:] == ["RUNNING", "COMPLETED"], history
    key = next(o["Key"] for o in s3.list_objects_v2(
        Bucket="cifar-pipeline", Prefix="objects/runs/prefect-restart/")["Contents"]
        if o["Key"].endswith("registered.json"))
    result = json.loads(s3.get_object(Bucket="cifar-pipeline", Key=key)["Body"].read())
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(f"run_id='{result['run_id']}'")
    assert [v.version for v in versions] == [result["version"]]

    # The same worker processes, not restarted ones, pick up and finish new work.
    assert {n: p for n, p in stack_pids(stack["state"]).items()
            if n.startswith("worker.")} == workers_before
    after = run_deployment("score-competition/score-competition", timeout=0, parameters={
        "config": {"model_uri": f"models:/cifar10-resnet/{result['version']}", "tta": False,
                   "output": "restart-check", "device": "cpu"}})
    with _prefect() as client:
        finished = _wait_final(client, after.id, timeout=300)
    assert finished.state.is_completed(), finished.state.message
    # Only the gpu pool's two workers could have run it; both heartbeat again. A worker
    # beats every 30 s, and its loop backs off after the beats that failed during the
    # outage, so the first beat after the restart may take longer than one period.
    deadline = time.monotonic() + 150
    while True:
        with _prefect() as client:
            workers = client.read_workers_for_work_pool("gpu")
        if len(workers) >= 2 and all(
                w.status.value == "ONLINE" and w.last_heartbeat_time.timestamp() > restarted
                for w in workers):
            break
        assert time.monotonic() < deadline, [(w.name, w.status, w.last_heartbeat_time)
                                             for w in workers]
        time.sleep(2)


def test_a_burst_of_run_creations_and_reads_during_a_training_gets_no_5xx(stack):
    """What the UI's Run button sends, 60 times from 12 threads, with 60 reads beside them,
    straight over HTTP (Prefect's Python client would retry a 503; the UI does not)."""
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    # Long enough to outlast the burst; cancelled after it.
    job = {"training": {"recipe": "fast", "variant": "light", "epochs": 8, "batch_size": 32,
                        "seed": 12},
           "data": {"data_source": str(PARQUET), "val_size": 64, "train_size": 128},
           "run_key": "burst"}
    training = run_deployment("train-variant/train-variant", parameters={"job": job},
                              timeout=0)
    with _prefect() as client:
        deadline = time.monotonic() + 300
        while not (state := client.read_flow_run(training.id).state).is_running():
            assert time.monotonic() < deadline and not state.is_final(), state
            time.sleep(0.5)
    api = os.environ["PREFECT_API_URL"]
    # The stack's API takes only its own credentials (auth is on by default).
    signed = {"Authorization": "Basic " + base64.b64encode(
        os.environ["PREFECT_API_AUTH_STRING"].encode()).decode()}

    def call(path: str, body: dict | None = None, method: str = "POST",
             headers: dict = signed) -> tuple[int, object]:
        request = urllib.request.Request(
            f"{api}{path}", method=method, headers={"Content-Type": "application/json",
                                                    **headers},
            data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, None

    path = "/deployments/name/score-competition/score-competition"
    assert call(path, method="GET", headers={})[0] == 401
    status, deployment = call(path, method="GET")
    assert status == 200
    # Scheduled for tomorrow, so that no worker runs them; deleted at the end.
    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    create = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}}

    def one(i: int) -> tuple[str, int, object]:
        if i % 2:
            return ("read", *call("/flow_runs/filter", {"limit": 10}))
        return ("create", *call(f"/deployments/{deployment['id']}/create_flow_run",
                                {**create, "name": f"burst-{i}"}))

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(120)))
    created = [body["id"] for kind, code, body in results if kind == "create" and code < 300]
    for flow_run_id in created:
        call(f"/flow_runs/{flow_run_id}", method="DELETE")
    errors = [(kind, code) for kind, code, _ in results if code >= 500]
    assert errors == [] and len(created) == 60, (errors, len(created))
    with _prefect() as client:  # the training ran all through the burst; no need to finish
        assert client.read_flow_run(training.id).state.is_running()
        client.set_flow_run_state(training.id, Cancelling())
        done = _wait_final(client, training.id)
    assert done.state.is_cancelled(), done.state.message


def test_load_of_trainings_and_scorings_completes_with_nothing_lost_or_duplicated(stack):
    from infra import loadtest

    report = loadtest.run_load(LOAD_TRAININGS, LOAD_SCORINGS, competition_file=str(SAMPLE),
                               data_source=str(PARQUET), timeout=900)
    print(report.table())
    assert report.ok, report.problems
    train, score = report.kinds
    assert (train.completed, score.completed) == (LOAD_TRAININGS, LOAD_SCORINGS)
    # Both workers took part.
    with _prefect() as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_=report.tag)))
    assert len(runs) == LOAD_TRAININGS + LOAD_SCORINGS
    assert len({r.id for r in runs}) == len(runs)


def test_no_stack_credential_is_in_mlflow_the_bucket_or_prefect(stack):
    secrets = json.loads((stack["state"] / "stack" / "secrets.json").read_text())
    needles = {name: value.encode() for name, value in secrets.items()}
    needles["AWS_SECRET_ACCESS_KEY"] = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    assert secrets["s3_secret_access_key"] == os.environ["AWS_SECRET_ACCESS_KEY"]
    leaks: list[str] = []
    scanned = {"mlflow runs": 0, "objects": 0, "bytes": 0, "prefect logs": 0,
               "flow runs": 0}

    def scan(where: str, blob: bytes | str) -> None:
        data = blob.encode() if isinstance(blob, str) else blob
        scanned["bytes"] += len(data)
        leaks.extend(f"{name} in {where}" for name, value in needles.items() if value in data)

    import mlflow

    client = mlflow.MlflowClient()
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=5000)
    for run in runs:
        scanned["mlflow runs"] += 1
        scan(f"run {run.info.run_id} params", json.dumps(run.data.params))
        scan(f"run {run.info.run_id} tags", json.dumps(run.data.tags))
    for model in client.search_registered_models():
        scan(f"model {model.name}", json.dumps({"tags": model.tags, "aliases": model.aliases}))
    for version in client.search_model_versions():
        scan(f"version {version.version} tags", json.dumps(version.tags))
    # Every artifact (MLflow's bucket) and every object the pipeline wrote.
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    for bucket in ("cifar-mlflow", "cifar-pipeline"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                scanned["objects"] += 1
                scan(f"s3://{bucket}/{obj['Key']}",
                     s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())

    from prefect.client.schemas.filters import LogFilter

    with _prefect() as prefect:
        offset = 0
        while batch := prefect.read_logs(log_filter=LogFilter(), limit=200, offset=offset):
            scanned["prefect logs"] += len(batch)
            scan("prefect logs", "\n".join(log.message for log in batch))
            offset += len(batch)
        offset = 0
        while flow_runs := prefect.read_flow_runs(limit=200, offset=offset):
            for flow_run in flow_runs:
                scan(f"flow run {flow_run.name}", json.dumps(flow_run.parameters, default=str))
            scanned["flow runs"] += len(flow_runs)
            offset += len(flow_runs)
        for pool in prefect.read_work_pools():
            scan(f"work pool {pool.name}", json.dumps(pool.base_job_template))
        for deployment in prefect.read_deployments():
            scan(f"deployment {deployment.name}",
                 json.dumps({"vars": deployment.job_variables, "params": deployment.parameters,
                             "pull": deployment.pull_steps}, default=str))

    print("credential scan:", scanned)
    assert leaks == []
    # The scan saw the runs of this session's stack: it could have found something.
    assert scanned["mlflow runs"] >= 5 and scanned["objects"] >= 20
    assert scanned["prefect logs"] >= 50 and scanned["flow runs"] >= 8
