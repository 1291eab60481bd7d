"""The fit-and-register task: `model.train.fit` inside an MLflow run, with checkpoints in
object storage and the result registered in the model registry.

Everything one job writes to object storage lives under `runs/<run_key>/<job>/`:
`checkpoint.pt` (the latest checkpoint), `mlflow_run.json` (the MLflow run to continue) and
`registered.json` (the version, once registered). A rerun with the same run key resumes
the checkpoint, continues the same MLflow run, and never registers a second version.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from prefect import task
from prefect.artifacts import create_image_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from model.checkpoint import CHECKPOINT_NAME
from model.config import DataConfig, TrainConfig
from model.data import Dataset
from model.nets import summary
from model.predict import resolve_device
from model.provenance import code_commit, installed_packages
from model.train import FitResult, fit
from tasks import gpu, plots, registry
from tasks.data import log_dataset
from tasks.metrics import MetricSink
from tasks.progress import Tracker
from tasks.settings import Settings
from tasks.storage import MissingObjectError, open_store
from tasks.tracking import run_links, tracked_run


class VariantJob(BaseModel):
    """One training job, as the child flow's parameters: its model config, its data, and
    where its state lives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    training: TrainConfig
    data: DataConfig = DataConfig()
    data_digest: str | None = Field(None, description="what the parent decoded from the "
                                    "data source: a job whose data differs fails")
    run_key: str = Field(min_length=1, description="jobs with the same key share checkpoints: "
                         "a retry or rerun resumes")
    parent_run_id: str | None = Field(None, description="MLflow run to nest under")

    @property
    def name(self) -> str:
        return f"{self.training.variant}-seed{self.training.seed}"

    @property
    def prefix(self) -> str:
        """Where this job's state lives in object storage: jobs of one run key side by
        side, each config apart (a changed config never resumes another's checkpoint)."""
        return "/".join(("runs", self.run_key, f"{self.name}-{self.training.hash()}"))


@dataclass
class VariantResult:
    variant: str
    seed: int
    recipe: str
    run_id: str
    version: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    params: int = 0
    param_mb: float = 0.0
    resumed_from_epoch: int | None = None
    val_digest: str = ""  # the validation images val/acc was measured on

    @property
    def val_acc(self) -> float:
        return self.metrics["val/acc"]


@task(name="fit-and-register", cache_policy=NONE, persist_result=False)
def fit_and_register(job: VariantJob, data: Dataset, settings: Settings,
                     should_stop: Callable[[], bool] | None = None) -> VariantResult:
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    settings.apply()
    store = open_store(settings.object_store)
    done = read_result(store, job)
    if done is not None:
        logger.info("%s already registered as version %s; not training again",
                    job.name, done.version)
        return done

    run_id = (_read_json(store, f"{job.prefix}/mlflow_run.json") or {}).get("run_id")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = Path(tmp)
        key = f"{job.prefix}/{CHECKPOINT_NAME}"
        if store.exists(key):
            store.get_file(key, ckpt_dir / CHECKPOINT_NAME)
            logger.info("resuming %s from %s", job.name, store.uri(key))
        with tracked_run(
            run_id=run_id, run_name=None if run_id else job.name,
            nested=job.parent_run_id is not None and run_id is None,
            parent_run_id=job.parent_run_id if run_id is None else None,
            # CPU, memory and (with nvidia-ml-py) GPU use; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
            # =false turns it off.
            log_system_metrics=settings.system_metrics,
        ) as run:
            if run_id is None:
                store.put(f"{job.prefix}/mlflow_run.json",
                          json.dumps({"run_id": run.info.run_id}).encode())
                _log_params(job, data, settings)
                log_dataset(data)
            sink = MetricSink(mlflow.MlflowClient(), run.info.run_id, on_error=lambda exc:
                              logger.warning("MLflow did not take metrics, retrying: %s", exc))
            progress = _EpochLogger(sink, job, logger, gpu.Monitor(job.training.device))
            try:
                # Checkpoints are written and uploaded on fit's background thread.
                result = fit(job.training, data, on_epoch_end=progress, checkpoint_dir=ckpt_dir,
                             on_checkpoint=lambda path: store.put_file(key, path),
                             should_stop=should_stop)
            except BaseException:
                sink.close(timeout=10)  # deliver what it can; the failure is the news
                raise
            _log_final(sink, result)
            # Every metric is in MLflow before anything is registered, or the run fails.
            sink.close(timeout=settings.metrics_flush_seconds)
            _log_artifacts(job, data, result, run)
            version = register_version(job, data, result)
            outcome = VariantResult(
                variant=job.training.variant, seed=job.training.seed, recipe=job.training.recipe,
                run_id=run.info.run_id, version=str(version.version), metrics=result.metrics,
                history=result.history, params=int(result.metrics["params"]),
                param_mb=summary(result.model).param_mb,
                resumed_from_epoch=result.resumed_from_epoch, val_digest=data.val.digest)
    store.put(f"{job.prefix}/registered.json", json.dumps(asdict(outcome)).encode())
    return outcome


def register_version(job: VariantJob, data: Dataset, result: FitResult):
    tags = {
        "recipe": job.training.recipe, "seed": job.training.seed,
        "data_digest": data.digest, "val_digest": data.val.digest,
        # Full precision: promotion compares this tag with the next candidate's accuracy,
        # and a rounded tag would let an equal newcomer "beat" the champion.
        "val_acc": repr(float(result.metrics["val/acc"])),
        "config_hash": job.training.hash(),
        # `cifar-pipeline models --compare` summarises seeds from these.
        **{tag: repr(float(result.metrics[key])) for key, tag in
           (("val/acc_tta", "val_acc_tta"), ("test/acc", "test_acc")) if key in result.metrics},
    }
    # The version's model card is written from the final metrics, the config and the data.
    return registry.register(result.model, variant=job.training.variant, tags=tags,
                             tta=bool(job.training.tta), metrics=result.metrics,
                             config=job.training.to_dict(), data=data)


class _EpochLogger:
    """on_epoch_end: the epoch's metrics, and its GPU's use, to MLflow; the progress to
    the run page and the terminal."""

    def __init__(self, sink: MetricSink, job: VariantJob, logger, monitor: gpu.Monitor):
        self.sink, self.job, self.logger, self.monitor = sink, job, logger, monitor
        self.progress = Tracker(f"{job.name} epoch", job.training.epochs,
                                key=f"training-{job.name}")

    def __call__(self, metrics: dict[str, float]) -> None:
        epoch = int(metrics["epoch"])
        values = {k: v for k, v in metrics.items() if k != "epoch"}
        self.sink.log({**values, **self.monitor.sample()}, step=epoch)
        self.progress.update(epoch + 1, f"val acc {100 * metrics['val/acc']:.2f}%")
        self.logger.info(
            "%s epoch %d/%d: train loss %.3f acc %.2f%%, val loss %.3f acc %.2f%%, %.1f s",
            self.job.name, epoch + 1, self.job.training.epochs, metrics["train/loss"],
            100 * metrics["train/acc"], metrics["val/loss"], 100 * metrics["val/acc"],
            metrics["epoch_seconds"])


def _log_params(job: VariantJob, data: Dataset, settings: Settings) -> None:
    device = resolve_device(job.training.device)
    params: dict[str, Any] = {**job.training.to_dict(), "config_hash": job.training.hash()}
    params.update(data_source=data.source, data_digest=data.digest, val_digest=data.val.digest,
                  train_images=len(data.train), val_images=len(data.val), run_key=job.run_key,
                  git_commit=code_commit(), torch_version=torch.__version__,
                  cuda_version=torch.version.cuda or "none",
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else platform.processor() or platform.machine())
    mlflow.log_params(params)
    # Which machine and worker ran the job: a process worker is the parent of its runs.
    mlflow.set_tags({"variant": job.training.variant, "recipe": job.training.recipe,
                     "host": socket.gethostname(), "pid": os.getpid(), "ppid": os.getppid(),
                     "cuda_visible_devices": settings.cuda_visible_devices})


def _log_final(sink: MetricSink, result: FitResult) -> None:
    step = len(result.history) - 1
    sink.log({f"final/{key}": value for key, value in result.metrics.items()}, step=step)
    if "test/acc" in result.metrics:
        sink.log({"test/acc": result.metrics["test/acc"]}, step=step)


def _log_artifacts(job: VariantJob, data: Dataset, result: FitResult, run) -> None:
    title = f"{job.training.variant} ({job.training.recipe}, seed {job.training.seed})"
    # fit() already predicted the validation split, with TTA where configured.
    matrix = plots.confusion_matrix(data.val.labels, result.val_predicted)
    mlflow.log_figure(plots.curves(result.history, title), "curves.png")
    mlflow.log_figure(plots.confusion(matrix, data.classes, f"validation confusion, {title}"),
                      "confusion_matrix.png")
    # Tables the MLflow UI shows and compares: rows true classes, a column per prediction.
    mlflow.log_table({"true": list(data.classes), **{
        name: matrix[:, i].tolist() for i, name in enumerate(data.classes)}},
        "confusion_matrix.json")
    mlflow.log_table({k: [h[k] for h in result.history] for k in result.history[0]},
                     "history.json")
    mlflow.log_text(summary(result.model).table() + "\n", "model_summary.txt")
    mlflow.log_dict(job.training.to_dict(), "config.json")
    mlflow.log_text(installed_packages(), "packages.txt")  # the exact environment
    run_page, curves = run_links(run.info, "curves.png")
    create_image_artifact(curves, key=f"curves-{job.name}", description=f"{title}: {run_page}")


def read_result(store, job: VariantJob) -> VariantResult | None:
    """The result a finished job left in object storage, if it finished."""
    done = _read_json(store, f"{job.prefix}/registered.json")
    return VariantResult(**done) if done is not None else None


def _read_json(store, key: str) -> dict | None:
    try:
        return json.loads(store.get(key))
    except MissingObjectError:
        return None
