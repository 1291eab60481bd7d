"""The child flow: train one variant and seed on whichever worker picks it up.

The parent flow starts it on the `gpu` work pool with `run_deployment`, one per variant and
seed (tasks/dispatch.py). It loads the data itself (workers share nothing but object
storage and MLflow), and leaves its result in object storage, where a retry or a rerun with
the same run key finds the checkpoint to resume from, or the registered version to return.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow

from tasks.data import prepare_data
from tasks.settings import Settings
from tasks.training import VariantJob, fit_and_register


@flow(name="train-variant", retries=2, retry_delay_seconds=10, log_prints=True)
def train_variant_flow(job: VariantJob) -> dict:
    settings = Settings.from_env()
    settings.apply()
    data = prepare_data(settings, job.data)
    return asdict(fit_and_register(job, data, settings))
