"""The child flow: train one variant and seed on whichever worker picks it up.

The parent flow starts it on the `gpu` work pool with `run_deployment`, one per variant and
seed. It loads the data itself (workers share nothing but object storage and MLflow), and
leaves its result in object storage, where a retry or a rerun with the same run key finds
the checkpoint to resume from, or the registered version to return.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from model.train import TrainConfig as ModelConfig
from tasks.data import prepare_data
from tasks.settings import Settings
from tasks.training import Job, train_variant


class VariantJob(BaseModel):
    """Everything a worker needs to train one job, as flow parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig
    run_key: str = Field(min_length=1, description="jobs with the same key share checkpoints")
    data_source: str | None = None
    val_size: int = Field(5000, ge=1)
    train_size: int | None = Field(None, ge=1)
    split_seed: int = Field(0, ge=0)
    parent_run_id: str | None = Field(None, description="MLflow run to nest under")

    @property
    def job(self) -> Job:
        return Job(self.model, self.run_key)


@flow(name="train-variant", retries=2, retry_delay_seconds=10, log_prints=True)
def train_variant_flow(job: VariantJob) -> dict:
    settings = Settings.from_env()
    settings.apply()
    data = prepare_data(settings, job.data_source, job.val_size, job.train_size,
                        job.split_seed)
    return asdict(train_variant(job.job, data, settings, job.parent_run_id))
