"""Pool dispatch: one child `train-variant` flow run per job on the GPU work pool.

Children report through object storage (registered.json), so the parent needs no result
storage shared with the workers; idempotency keys and the two deadlines are described in
the README (Run on a GPU cluster).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prefect import get_client, get_run_logger
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Scheduled

from model.errors import UserError
from tasks.progress import Tracker
from tasks.settings import Settings
from tasks.storage import open_store
from tasks.training import VariantJob, VariantResult, read_result

POLL_SECONDS = 2.0
NOT_STARTED = (StateType.SCHEDULED, StateType.PENDING)  # Late is a Scheduled state
RESTARTABLE = (StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)


class DispatchError(UserError, RuntimeError):
    """The children on the work pool did not start or did not finish in time."""

    resumable = True


@dataclass(frozen=True)
class PoolOptions:
    """How pool dispatch runs: the child deployment and the two deadlines, in seconds."""

    child_deployment: str
    start_timeout_seconds: float
    timeout_seconds: float


def idempotency_key(job: VariantJob) -> str:
    return f"train-variant/{job.run_key}/{job.name}-{job.training.hash()}"


def run_tags(job: VariantJob) -> list[str]:
    """Run tags for the UI's filters and the pools' automations."""
    t = job.training
    return [f"variant:{t.variant}", f"recipe:{t.recipe}", f"seed:{t.seed}", "gpu"]


def run_on_pool(jobs: list[VariantJob], options: PoolOptions, settings: Settings):
    """Start (or attach to) one child per job, wait for all, keep what succeeded:
    (results, {job: why it failed})."""
    logger = get_run_logger()
    children = {}
    with get_client(sync_client=True) as client:
        for job in jobs:
            run = run_deployment(options.child_deployment,
                                 parameters={"job": job.model_dump(mode="json")}, timeout=0,
                                 flow_run_name=f"{job.name} {job.run_key[:8]}",
                                 tags=run_tags(job), idempotency_key=idempotency_key(job))
            if run.state is not None and run.state.type in RESTARTABLE:
                # A retried parent: the child failed before; run it again (it resumes from
                # its checkpoint) rather than create a second run for the same job.
                client.set_flow_run_state(run.id, Scheduled(), force=True)
                logger.info("rescheduled %s (flow run %s, was %s)", job.name, run.id,
                            run.state.type.value)
            else:
                logger.info("%s is flow run %s", job.name, run.id)
            children[job.name] = (job, run.id)
        pool = client.read_deployment_by_name(options.child_deployment).work_pool_name
        states = _wait(client, children, pool, options, logger)
    store = open_store(settings.object_store)
    results: list[VariantResult] = []
    failed = {}
    for name, (job, _) in children.items():
        state = states[name]
        result = read_result(store, job) if state.is_completed() else None
        if result is None:
            failed[name] = f"{state.type.value}: {state.message or 'no result'}"
        else:
            results.append(result)
    return results, failed


def _wait(client, children, pool: str, options: PoolOptions, logger) -> dict:
    """Poll the children until all have ended. The start deadline is a stall clock, running
    only while none of them runs, so children queued behind their siblings wait."""
    started_at = progress_at = time.monotonic()
    states, running, progress = {}, set(), Tracker("jobs done", len(children), key="jobs")
    while len(states) < len(children):
        for name, (_, run_id) in children.items():
            if name in states:
                continue
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                states[name] = state
                running.discard(name)
                progress_at = time.monotonic()
                logger.info("%s ended %s", name, state.type.value)
                progress.update(len(states))
            elif state is not None and state.type not in NOT_STARTED:
                running.add(name)
            else:
                running.discard(name)  # rescheduled: a crashed child's run is retried
        now = time.monotonic()
        if running:
            progress_at = now
        waiting = [n for n in children if n not in states and n not in running]
        if waiting and now - progress_at > options.start_timeout_seconds:
            _cancel(client, children, states)
            raise DispatchError(
                f"{', '.join(waiting)} did not start within {options.start_timeout_seconds:g} s "
                f"on work pool {pool!r}: {_pool_health(client, pool)}; the children of this "
                "run were cancelled. Start a worker (python -m infra.workers start --pool "
                f"{pool}), or raise start_timeout_seconds if the pool is busy with other "
                "runs, then rerun with the same run key to resume")
        if len(states) < len(children) and now - started_at > options.timeout_seconds:
            _cancel(client, children, states)
            raise DispatchError(
                f"the children on work pool {pool!r} did not all finish within "
                f"{options.timeout_seconds:g} s; the unfinished ones were cancelled. Rerun with "
                "the same run key to resume them from their checkpoints")
        if len(states) < len(children):
            time.sleep(POLL_SECONDS)
    return states


def _pool_health(client, pool: str) -> str:
    try:
        workers = client.read_workers_for_work_pool(pool)
    except Exception as exc:  # the pool itself may be gone
        return f"the pool cannot be read ({type(exc).__name__}: {exc})"
    online = [w for w in workers if str(getattr(w, "status", "")).upper().endswith("ONLINE")]
    if not online:
        return "no worker is polling it"
    return (f"{len(online)} worker(s) poll it but took none of these runs (busy, or the "
            "pool's concurrency limit is reached)")


def _cancel(client, children, states) -> None:
    for name, (_, run_id) in children.items():
        if name not in states:
            client.set_flow_run_state(run_id, Cancelled(message="the parent run gave up "
                                                        "waiting for it"), force=True)
