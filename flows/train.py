"""The training flow: prepare data, train each variant and seed, promote, optionally score.

Jobs run one after another on a single device, and side by side, one per GPU, when
several GPUs are visible.
"""

from __future__ import annotations

import math
from typing import Literal

import mlflow
import torch
from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.data import read_competition_pickle
from model.train import CompileMode
from model.train import TrainConfig as ModelConfig
from tasks.data import log_dataset, prepare_data
from tasks.promote import Promotion, promote
from tasks.settings import Settings
from tasks.tracking import tracked_run
from tasks.training import Job, VariantResult, train_variant


class TrainConfig(BaseModel):
    """Parameters of the training flow; the Prefect UI renders them as its form.
    Unset numbers take the recipe's defaults (model/train.py, RECIPE_DEFAULTS)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    variants: list[Literal["deep", "light"]] = Field(["deep", "light"], min_length=1)
    recipe: Literal["reference", "paper", "fast"] = "fast"
    epochs: int | None = Field(None, ge=1, le=10_000)
    batch_size: int | None = Field(None, ge=1, le=65_536)
    lr: float | None = Field(None, gt=0, le=10)
    cutout: int | None = Field(None, ge=0, le=32)
    ema: float | None = Field(None, ge=0, lt=1,
                              description="weight EMA decay per step, e.g. 0.999; 0 = off")
    seeds: list[int] = Field([0], min_length=1, description="one job per variant and seed")
    data_source: str | None = Field(
        None, description="path, file:// or s3:// URI; default $CIFAR10_SOURCE, else download"
    )
    val_size: int = Field(5000, ge=1, description="images held out of training for validation")
    train_size: int | None = Field(None, ge=1, description="train on a stratified subset")
    split_seed: int = Field(0, ge=0, description="seeds the validation hold-out")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    compile: bool | None = Field(
        None, description="torch.compile the training step; default: on for paper and fast "
        "on CUDA")
    compile_mode: CompileMode = Field(
        "default", description="torch.compile mode; reduce-overhead adds CUDA graphs")
    score_after: bool = Field(False, description="score the competition file after promotion")
    competition_file: str | None = Field(None, description="input of the scoring step")
    run_key: str | None = Field(
        None, description="runs with the same key share checkpoints; default: the flow run id"
    )
    dispatch: Literal["local", "pool"] = Field(
        "local", description="local: train in this process; pool: one child flow run per "
        "job on the GPU work pool (deployment train-variant)")
    child_deployment: str = Field("train-variant/train-variant",
                                  description="the deployment that pool dispatch runs")

    @field_validator("lr", "ema")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"seeds must be distinct and non-negative, got {value}")
        return value

    def model_configs(self) -> list[ModelConfig]:
        """One model config per variant and seed; validates them all before any work."""
        overrides = {k: v for k, v in dict(epochs=self.epochs, batch_size=self.batch_size,
                                            lr=self.lr, cutout=self.cutout,
                                            ema=self.ema).items()
                     if v is not None}
        return [ModelConfig(recipe=self.recipe, variant=variant, seed=seed, device=self.device,
                            compile=self.compile, compile_mode=self.compile_mode, **overrides)
                for variant in self.variants for seed in self.seeds]


@flow(name="train-resnets", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
def train(config: TrainConfig = TrainConfig()) -> dict:  # noqa: B008 (a frozen default)
    logger = get_run_logger()
    settings = Settings.from_env()
    settings.apply()
    configs = config.model_configs()
    run_key = config.run_key or str(get_run_context().flow_run.id)
    if config.score_after:
        # A bad competition file is found now, not after hours of training.
        from flows.score import competition_input

        read_competition_pickle(competition_input(config.competition_file))

    with tracked_run(run_name=f"train-resnets {run_key[:8]}") as parent:
        mlflow.log_params({"flow." + k: v for k, v in config.model_dump().items()})
        data = prepare_data(settings, config.data_source, config.val_size, config.train_size,
                            config.split_seed)
        log_dataset(data)
        if config.dispatch == "pool":
            results, failed = _run_on_pool(config, configs, run_key, parent.info.run_id,
                                           settings)
        else:
            results, failed = _run_here(configs, run_key, data, settings, parent.info.run_id)
        if not results:
            raise JobsFailedError(f"every training job failed: {failed}")
        for name, why in failed.items():
            logger.error("job %s failed, continuing with the others: %s", name, why)
        decision: Promotion = promote(results, data, settings)
        mlflow.set_tag("champion_version", decision.champion_version or "")

    summary = {
        "run_key": run_key,
        "mlflow_run_id": parent.info.run_id,
        "versions": {f"{r.variant}-seed{r.seed}": r.version for r in results},
        "val_acc": {f"{r.variant}-seed{r.seed}": r.val_acc for r in results},
        "champion": decision.champion_version,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "data_digest": data.digest,
        "failed": failed,
    }
    if config.score_after:
        from flows.score import ScoreConfig, score

        summary["score"] = score(ScoreConfig(input_uri=config.competition_file))
    logger.info("champion: version %s (%s)", decision.champion_version, decision.reason)
    if failed:
        # The survivors are registered and compared; the run still ends Failed, so the
        # failure shows in the UI and in the exit status.
        raise JobsFailedError(f"{len(failed)} of {len(configs)} jobs failed: {failed}; "
                              f"the others were registered: {summary['versions']}")
    return summary


class JobsFailedError(RuntimeError):
    """Some training jobs of a flow run failed."""


def _run_here(configs, run_key, data, settings, parent_run_id):
    """In this process: one job after another on one device, side by side on several."""
    jobs = [Job(c, run_key) for c in _place_on_devices(configs)]
    if _gpu_count() > 1:
        futures = {job.name: train_variant.submit(job, data, settings, parent_run_id)
                   for job in jobs}
        outcomes = {}
        for name, future in futures.items():
            try:
                outcomes[name] = future.result()
            except Exception as exc:
                outcomes[name] = exc
    else:
        outcomes = {}
        for job in jobs:
            try:
                outcomes[job.name] = train_variant(job, data, settings, parent_run_id)
            except Exception as exc:
                outcomes[job.name] = exc
    results = [r for r in outcomes.values() if isinstance(r, VariantResult)]
    failed = {n: f"{type(r).__name__}: {r}" for n, r in outcomes.items()
              if not isinstance(r, VariantResult)}
    return results, failed


def _run_on_pool(config, configs, run_key, parent_run_id, settings):
    """One child flow run per job on the work pool; wait for all, keep what succeeded.

    Children report through object storage (registered.json), so the parent needs no
    shared result storage with the workers.
    """
    import time

    from prefect import get_client
    from prefect.deployments import run_deployment

    from flows.train_variant import VariantJob
    from tasks.storage import open_store
    from tasks.training import read_result

    logger = get_run_logger()
    children = {}
    for model_config in configs:
        job = VariantJob(model=model_config, run_key=run_key, data_source=config.data_source,
                         val_size=config.val_size, train_size=config.train_size,
                         split_seed=config.split_seed, parent_run_id=parent_run_id)
        run = run_deployment(config.child_deployment, parameters={"job": job.model_dump()},
                             timeout=0, flow_run_name=f"{job.job.name} {run_key[:8]}")
        children[job.job.name] = (job, run.id)
        logger.info("started %s as flow run %s", job.job.name, run.id)
    states = {}
    with get_client(sync_client=True) as client:
        while len(states) < len(children):
            for name, (_, run_id) in children.items():
                if name in states:
                    continue
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    states[name] = state
                    logger.info("%s ended %s", name, state.type.value)
            time.sleep(2)
    store = open_store(settings.object_store)
    results, failed = [], {}
    for name, (job, _) in children.items():
        state = states[name]
        result = read_result(store, job.job) if state.is_completed() else None
        if result is None:
            failed[name] = f"{state.type.value}: {state.message or 'no result'}"
        else:
            results.append(result)
    return results, failed


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _place_on_devices(configs: list[ModelConfig]) -> list[ModelConfig]:
    """With several GPUs and device=auto, job i goes to GPU i mod count."""
    n = _gpu_count()
    if n <= 1:
        return configs
    return [c.model_copy(update={"device": f"cuda:{i % n}"}) if c.device == "auto" else c
            for i, c in enumerate(configs)]
