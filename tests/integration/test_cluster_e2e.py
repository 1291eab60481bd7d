"""End to end on the local stack: PostgreSQL, SeaweedFS's S3, Prefect and MLflow servers,
deployments from prefect.yaml and two process workers on the `gpu` pool (CPU slots here).

`train-resnets` is triggered through the Prefect API with `dispatch="pool"`; its two
children must run on different workers at the same time, register their versions, and the
promotion event must trigger `score-competition`, whose predictions land in the bucket.
Then a worker is SIGKILLed in the middle of a child run, and the rerun resumes from the
checkpoint in S3 and registers one version. Last, a real browser looks at both UIs.

The stack is the session's (`stack` in tests/conftest.py); this module runs first on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from tests.conftest import SHARED_PARQUET as PARQUET
from tests.conftest import stack_browser_page, stack_pids

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output"
SMALL = {"epochs": 1, "batch_size": 64, "train_size": 256, "val_size": 128,
         "data_source": str(PARQUET)}


def _prefect():
    from prefect import get_client

    return get_client(sync_client=True)


def _wait_final(client, flow_run_id, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish within {timeout} s")


def _children(client, parent_run):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_run.id])))
    return [r for r in runs if r.deployment_id is not None]


def _keys(s3, prefix: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket="cifar-pipeline", Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


def _worker_pids(state: Path) -> dict[int, str]:
    return {pid: name for name, pid in stack_pids(state).items()}


RUN_KEY = "e2e-idempotent"


@pytest.fixture(scope="module")
def trained(stack):
    """train-resnets triggered through the API, as the UI or the schedule would; then the
    same run key again while the first parent's children still run, as a retried parent
    or an impatient user would."""
    from prefect.deployments import run_deployment

    # Two seeds of light: two children, at the lower cost of the two variants.
    config = {"dispatch": "pool", "variants": ["light"], "seeds": [0, 1], "run_key": RUN_KEY,
              **SMALL}
    run = run_deployment("train-resnets/train-resnets", parameters={"config": config},
                         timeout=0)
    with _prefect() as client:
        _wait_for_children(client, run, 2)
        again = run_deployment("train-resnets/train-resnets", parameters={"config": config},
                               timeout=0)
        run = _wait_final(client, run.id, timeout=900)
        again = _wait_final(client, again.id, timeout=900)
        children = _children(client, run)
    return run, children, again


def _wait_for_children(client, parent, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_children(client, parent)) < count:
        assert time.monotonic() < deadline, "the parent started no children"
        time.sleep(1)


def _variant_runs(client, run_key: str, deployment: str = "train-variant"):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
        name=DeploymentFilterName(any_=[deployment])))
    return [r for r in runs if r.name.endswith(f" {run_key[:8]}")]


def test_a_second_parent_with_the_same_run_key_attaches_to_the_running_children(
        stack, trained):
    import mlflow

    run, children, again = trained
    assert run.state.is_completed() and again.state.is_completed(), again.state.message
    with _prefect() as client:
        runs = _variant_runs(client, RUN_KEY)
    # One child run per job, for both parents; one registry version per job.
    assert sorted(r.name for r in runs) == [f"light-seed{s} {RUN_KEY[:8]}" for s in (0, 1)]
    assert {str(r.id) for r in runs} == {str(c.id) for c in children}
    versions = mlflow.MlflowClient().search_model_versions("name='cifar10-resnet'")
    assert sorted(v.tags["seed"] for v in versions) == ["0", "1"]
    # The children carry their job in their tags, beside the deployment's.
    assert {"variant:light", "recipe:fast", "gpu"} <= set(runs[0].tags)


def test_a_parent_whose_children_no_worker_takes_fails_fast_and_cancels_them(stack):
    """A pool nobody polls (a GPU pool whose workers are gone): the parent does not hang;
    it fails at its start deadline naming the pool, and cancels its children."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment

    with _prefect() as client:
        template = client.read_deployment_by_name("train-variant/train-variant")
        client.create_work_pool(WorkPoolCreate(name="gpu-unpolled", type="process"),
                                overwrite=True)
        client.create_deployment(
            flow_id=template.flow_id, name="unpolled", work_pool_name="gpu-unpolled",
            entrypoint=template.entrypoint, path=template.path,
            pull_steps=template.pull_steps,
            parameter_openapi_schema=template.parameter_openapi_schema)
    config = {"dispatch": "pool", "variants": ["light"], "run_key": "e2e-unpolled",
              "child_deployment": "train-variant/unpolled", "start_timeout_seconds": 10,
              **SMALL}
    run = run_deployment("train-resnets/train-resnets", parameters={"config": config},
                         timeout=0)
    with _prefect() as client:
        run = _wait_final(client, run.id, timeout=300)
        children = _variant_runs(client, "e2e-unpolled", deployment="unpolled")
        assert run.state.is_failed()
        message = client.read_flow_run_states(run.id)[-1].message or ""
    assert "'gpu-unpolled'" in message and "no worker is polling it" in message, message
    assert children and all(c.state.is_cancelled() for c in children), [
        c.state.type for c in children]


def test_pool_dispatch_trains_children_side_by_side_on_different_workers(stack, trained):
    import mlflow

    run, children, _ = trained
    assert run.state.is_completed(), run.state.message
    assert len(children) == 2 and all(c.state.is_completed() for c in children)
    # Overlapping run times: both were running at once.
    assert max(c.start_time for c in children) < min(c.end_time for c in children)
    # A process worker is the parent process of the flow runs it starts.
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='cifar10-resnet'")
    assert sorted(v.tags["seed"] for v in versions) == ["0", "1"]
    ppids = {int(client.get_run(v.run_id).data.tags["ppid"]) for v in versions}
    workers = _worker_pids(stack["state"])
    assert len(ppids) == 2 and ppids <= set(workers), (ppids, workers)


def test_registry_was_updated_through_the_mlflow_server(stack, trained):
    import mlflow

    assert os.environ["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    model = mlflow.MlflowClient().get_registered_model("cifar10-resnet")
    assert {"champion", "light"} <= set(model.aliases)


def test_promotion_event_triggers_scoring_and_predictions_land_in_s3(stack, trained):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _prefect() as client:
        deadline = time.monotonic() + 300
        scored = []
        while time.monotonic() < deadline and not scored:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["score-competition"])))
            scored = [r for r in runs if r.state is not None and r.state.is_completed()]
            time.sleep(3)
    assert scored, "no completed score-competition run was triggered by the promotion"
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="cifar-pipeline",
                                                 Prefix="objects/predictions/")["Contents"]]
    assert any(k.endswith("/manifest.json") for k in keys)
    csv_key = next(k for k in keys if k.endswith("/predictions.csv"))
    body = s3.get_object(Bucket="cifar-pipeline", Key=csv_key)["Body"].read().decode()
    assert body.startswith("ID,Labels\n") and len(body.strip().splitlines()) == 201


def test_the_training_deployment_carries_its_weekly_schedule(stack):
    with _prefect() as client:
        deployment = client.read_deployment_by_name("train-resnets/train-resnets")
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == ["0 3 * * 1"]
    assert deployment.parameters["config"]["dispatch"] == "pool"


def test_a_killed_worker_run_resumes_from_its_checkpoint_and_registers_once(stack, trained):
    import mlflow
    from prefect.deployments import run_deployment

    # A checkpoint after every epoch, so that the kill lands after one is in S3.
    job = {"training": {"recipe": "fast", "variant": "light", "epochs": 3, "batch_size": 32,
                        "seed": 7, "checkpoint_seconds": 0},
           "data": {"data_source": str(PARQUET), "val_size": 128, "train_size": 192},
           "run_key": "kill-test"}
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    first = run_deployment("train-variant/train-variant", parameters={"job": job}, timeout=0)

    def checkpoint_keys():
        return [k for k in _keys(s3, "objects/runs/kill-test/") if k.endswith(".pt")]

    deadline = time.monotonic() + 300
    while not checkpoint_keys():
        assert time.monotonic() < deadline, "no checkpoint reached S3"
        time.sleep(1)
    # SIGKILL the worker that runs it, and the run's own process with it.
    with _prefect() as client:
        run = client.read_flow_run(first.id)
    pid = int(run.infrastructure_pid.rsplit(":", 1)[-1])
    import psutil

    worker = psutil.Process(pid).parent()
    name = _worker_pids(stack["state"])[worker.pid]
    for process in (worker, psutil.Process(pid)):
        os.kill(process.pid, signal.SIGKILL)
    # supervisord restarts exactly the dead worker, by itself, within seconds.
    killed = time.monotonic()
    while stack_pids(stack["state"]).get(name) in (None, worker.pid):
        assert time.monotonic() - killed < 10, f"{name} was not restarted within 10 s"
        time.sleep(0.2)
    second = run_deployment("train-variant/train-variant", parameters={"job": job}, timeout=0)
    with _prefect() as client:
        done = _wait_final(client, second.id, timeout=600)
    assert done.state.is_completed(), done.state.message
    # The job leaves its result in object storage (registered.json).
    key = next(k for k in _keys(s3, "objects/runs/kill-test/") if k.endswith("registered.json"))
    result = json.loads(s3.get_object(Bucket="cifar-pipeline", Key=key)["Body"].read())
    assert result["resumed_from_epoch"] is not None and result["resumed_from_epoch"] >= 0
    versions = mlflow.MlflowClient().search_model_versions(f"run_id='{result['run_id']}'")
    assert [v.version for v in versions] == [result["version"]]


def test_the_uis_show_the_run_and_the_champion_in_a_real_browser(stack, trained):
    import mlflow
    from playwright import sync_api as playwright

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.fail("Debian's chromium is missing: ./setup.sh installs it with apt-get")
    OUTPUT.mkdir(exist_ok=True)
    run, _, _ = trained
    prefect_ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    mlflow_ui = os.environ["MLFLOW_TRACKING_URI"]
    with playwright.sync_playwright() as p:
        browser, page = stack_browser_page(p, os.environ)
        page.goto(f"{prefect_ui}/runs/flow-run/{run.id}")
        page.get_by_text("Completed").first.wait_for(timeout=60_000)
        page.screenshot(path=OUTPUT / "prefect-flow-run.png")
        page.goto(f"{mlflow_ui}/#/models/cifar10-resnet")
        page.get_by_text("champion").first.wait_for(timeout=60_000)
        # The registered model's description, rendered from its Markdown.
        page.get_by_text("CIFAR-10 classifiers").first.wait_for(timeout=60_000)
        page.screenshot(path=OUTPUT / "mlflow-registered-model.png")
        # The champion's model card: its Markdown rendered (headings, not `###` text).
        champion = mlflow.MlflowClient().get_model_version_by_alias("cifar10-resnet",
                                                                    "champion")
        page.goto(f"{mlflow_ui}/#/models/cifar10-resnet/versions/{champion.version}")
        page.get_by_role("heading", name="How to use it").wait_for(timeout=60_000)
        card = page.content()
        assert "### " not in card
        for text in ("ModifiedResNet", champion.tags["weights_sha256"], champion.run_id,
                     champion.tags["prefect_flow_run_id"]):
            assert text in card, text
        page.screenshot(path=OUTPUT / "mlflow-model-version.png", full_page=True)
        browser.close()
    assert (OUTPUT / "prefect-flow-run.png").stat().st_size > 0
    assert (OUTPUT / "mlflow-registered-model.png").stat().st_size > 0
    assert (OUTPUT / "mlflow-model-version.png").stat().st_size > 0


def _artifacts(client, run) -> dict[str, list]:
    """{type: [artifact]} of a flow run (its own, not its tasks')."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found: dict[str, list] = {}
    for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))):
        found.setdefault(artifact.type, []).append(artifact)
    return found


def test_the_run_pages_show_progress_and_curves_in_a_real_browser(stack, trained):
    """The parent's and a child's run pages as a user opens them: each has a progress
    artifact at 100%; the child's curves, an image served by MLflow, load."""
    from playwright import sync_api as playwright

    run, children, _ = trained
    child = children[0]
    assert run.name == f"train-resnets {RUN_KEY}"
    with _prefect() as client:
        pages = {"parent": (run, _artifacts(client, run)),
                 "child": (child, _artifacts(client, child))}
    for name, (_, found) in pages.items():
        (progress,) = found["progress"]
        assert progress.data == 100, (name, progress.data, progress.description)
    (curves,) = pages["child"][1]["image"]
    assert curves.data.startswith(os.environ["MLFLOW_TRACKING_URI"])
    prefect_ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    OUTPUT.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser, page = stack_browser_page(p, os.environ)
        for name, (flow_run, found) in pages.items():
            (progress,) = found["progress"]
            page.goto(f"{prefect_ui}/runs/flow-run/{flow_run.id}")
            page.get_by_text("Artifacts", exact=True).first.click()
            # The card shows the artifact's description: where it got to, and "done".
            card = page.get_by_text(progress.description).first
            card.wait_for(timeout=60_000)
            card.scroll_into_view_if_needed()
            page.screenshot(path=OUTPUT / f"prefect-{name}-run-artifacts.png")
            page.goto(f"{prefect_ui}/artifacts/artifact/{progress.id}")
            page.get_by_text("Progress: 100%").first.wait_for(timeout=60_000)
        page.goto(f"{prefect_ui}/artifacts/artifact/{curves.id}")
        image = page.locator(".artifact-data-image img")
        image.wait_for(timeout=60_000)
        page.wait_for_function("img => img.complete", arg=image.element_handle(),
                               timeout=60_000)
        assert image.evaluate("img => img.naturalWidth") > 100  # loaded, not a broken icon
        page.screenshot(path=OUTPUT / "prefect-child-curves.png", full_page=True)
        browser.close()


def _kept_outputs(s3) -> dict[str, str]:
    """{key: ETag} of the checkpoints and predictions in the bucket."""
    keys = [k for k in _keys(s3, "objects/") if k.endswith((".pt", "predictions.csv"))]
    return {k: s3.head_object(Bucket="cifar-pipeline", Key=k)["ETag"] for k in keys}


def _champion_predicts(stack) -> dict:
    """`cifar-pipeline predict --json` on the competition file, with the champion."""
    env = {**stack["env"], **stack["client_env"]}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cifar-pipeline"), "predict", "--json",
         env["CIFAR_COMPETITION_FILE"]], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_the_champion_and_its_outputs_outlive_a_killed_stack_and_a_down_and_up(stack, trained):
    """SIGKILL to supervisord and everything under it (a power cut, the OOM killer), `up`;
    then `down` and `up`: the champion still loads and predicts, and the checkpoints and
    predictions are still in the bucket, byte for byte."""
    import psutil

    from infra.procs import stack_processes

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    kept = _kept_outputs(s3)
    assert any(k.endswith(".pt") for k in kept) and any(k.endswith(".csv") for k in kept)
    before = _champion_predicts(stack)
    root = stack["state"] / "stack"
    victims = [psutil.Process(int((root / "supervisor" / "supervisord.pid").read_text())),
               *stack_processes(root)]
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(victims, timeout=10)
    for action in ("up", "down", "up"):
        # The deployments are in PostgreSQL with the rest: no need to deploy them again.
        args = ["--cpu-slots", "--workers", "2", "--no-deploy"] if action == "up" else []
        done = subprocess.run([*stack["cmd"], action, "--state-dir", str(stack["state"]), *args],
                              env=stack["env"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if action == "up":
            after = _champion_predicts(stack)
            assert after["model"] == before["model"]
            assert [p["class"] for p in after["predictions"]] == \
                [p["class"] for p in before["predictions"]]
            assert max(abs(a["confidence"] - b["confidence"]) for a, b in
                       zip(after["predictions"], before["predictions"], strict=True)) < 1e-5
            assert _kept_outputs(s3) == kept
