"""The training flow: prepare data, train each variant and seed, promote, optionally score.
Jobs run in this process, or as child flow runs on the GPU work pool (tasks/dispatch.py).
"""

from __future__ import annotations

import threading
from dataclasses import replace

import mlflow
import torch
from prefect import allow_failure, flow, get_run_logger
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from flows.config import TrainResnetsConfig, data_config
from model.data.uri import redact
from model.errors import UserError
from model.stats import as_metrics, seed_statistics
from tasks.data import load_data, log_dataset, source_uri
from tasks.progress import Tracker
from tasks.promote import Promotion, promote
from tasks.settings import Settings
from tasks.tracking import tracked_run
from tasks.training import VariantJob, VariantResult, fit_and_register


class JobsFailedError(UserError, RuntimeError):
    """Some training jobs of a flow run failed."""

    resumable = True


def _run_name() -> str:
    """`train-resnets <run key>`, the key the UI and the logs know the run by."""
    from prefect.runtime import flow_run

    config = TrainResnetsConfig.model_validate(flow_run.parameters.get("config", {}))
    return f"train-resnets {config.run_key or flow_run.id}"


@flow(name="train-resnets", flow_run_name=_run_name, log_prints=True,
      task_runner=ThreadPoolTaskRunner(max_workers=8))
def train(config: TrainResnetsConfig = TrainResnetsConfig()) -> dict:  # noqa: B008 (frozen)
    logger = get_run_logger()
    settings = Settings.from_env()
    settings.apply()
    config.training_configs()  # a bad combination is found now, not in a child
    run_key = config.run_key or str(get_run_context().flow_run.id)
    if config.score_after:
        # A bad competition file is found now, not after hours of training; what is read
        # now is what is scored.
        from tasks.scoring import competition_input, read_competition_file

        scoring_input = read_competition_file(
            competition_input(config.competition_file, settings))

    with tracked_run(run_name=f"train-resnets {run_key[:8]}") as parent:
        mlflow.log_params({"flow." + k: redact(v) if isinstance(v, str) else v
                           for k, v in config.model_dump().items()})
        data = load_data(settings, data_config(config))
        log_dataset(data)
        # Every job loads the source resolved here, and fails on data other than this.
        pinned = replace(data_config(config), data_source=source_uri(data.source))
        jobs = [VariantJob(training=c, data=pinned, data_digest=data.digest, run_key=run_key,
                           parent_run_id=parent.info.run_id) for c in config.training_configs()]
        if config.dispatch == "pool":
            from tasks.dispatch import PoolOptions, run_on_pool

            pool = PoolOptions(config.child_deployment, config.start_timeout_seconds,
                               config.timeout_seconds)
            results, failed = run_on_pool(jobs, pool, settings)
        else:
            results, failed = _run_here(jobs, data, settings)
        if not results:
            raise JobsFailedError(f"every training job failed: {failed}")
        for name, why in failed.items():
            logger.error("job %s failed, continuing with the others: %s", name, why)
        decision: Promotion = promote(results, data, settings)
        mlflow.set_tag("champion_version", decision.champion_version or "")
        seeds = seed_statistics([(r.variant, r.metrics) for r in results])
        mlflow.log_metrics(as_metrics(seeds))
        champion = next((r for r in results if r.version == decision.champion_version), None)

    summary = {
        "run_key": run_key, "mlflow_run_id": parent.info.run_id,
        "versions": {f"{r.variant}-seed{r.seed}": r.version for r in results},
        "val_acc": {f"{r.variant}-seed{r.seed}": r.val_acc for r in results},
        "champion": decision.champion_version, "promoted": decision.promoted,
        "reason": decision.reason, "data_digest": data.digest,
        "failed": failed, "seed_stats": seeds,
        # Never seen by selection, unlike the validation accuracy that chose the champion.
        "champion_test_acc": champion.metrics.get("test/acc") if champion else None,
    }
    if config.score_after:
        from flows.score import ScoreConfig, score_input

        summary["score"] = score_input(ScoreConfig(input_uri=scoring_input.uri),
                                       scoring_input, settings)
    logger.info("champion: version %s (%s)", decision.champion_version, decision.reason)
    if failed:
        # The survivors are registered and compared; the run still ends Failed, so the
        # failure shows in the UI and in the exit status.
        raise JobsFailedError(f"{len(failed)} of {len(jobs)} jobs failed: {failed}; "
                              f"the others were registered: {summary['versions']}")
    return summary


def _run_here(jobs: list[VariantJob], data, settings):
    """In this process, through the task runner: one job at a time on each device, the
    devices side by side (one chain of jobs per GPU). A failed job does not stop the next
    one on its device; an interrupt (Ctrl-C, SIGTERM) stops them all at their next batch."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    futures, last_on, stop = {}, {}, threading.Event()
    for job in _place_on_devices(jobs, gpus):
        device = job.training.device if gpus > 1 else "the one device"
        previous = last_on.get(device)
        futures[job.name] = fit_and_register.submit(
            job, data, settings, stop.is_set,
            wait_for=[allow_failure(previous)] if previous else None)
        last_on[device] = futures[job.name]
    progress, outcomes = Tracker("jobs done", len(futures), key="jobs"), {}
    try:
        for name, future in futures.items():  # in the order they were queued
            try:
                outcomes[name] = future.result()
            except Exception as exc:
                outcomes[name] = exc
            progress.update(len(outcomes))
    except BaseException:  # this thread was interrupted: the jobs' threads end too
        stop.set()
        raise
    results = [r for r in outcomes.values() if isinstance(r, VariantResult)]
    failed = {n: f"{type(r).__name__}: {r}" for n, r in outcomes.items()
              if not isinstance(r, VariantResult)}
    return results, failed


def _place_on_devices(jobs: list[VariantJob], gpus: int) -> list[VariantJob]:
    """With several GPUs and device=auto, job i goes to GPU i mod count."""
    if gpus <= 1:
        return jobs
    return [job.model_copy(update={"training": job.training.replace(device=f"cuda:{i % gpus}")})
            if job.training.device == "auto" else job for i, job in enumerate(jobs)]
