"""The child flow: train one variant and seed on whichever worker picks it up.

It loads the data source the parent names (workers share nothing but object storage and
MLflow) and fails on data other than the parent's; a retry finds its checkpoint in object
storage.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow

from tasks.data import load_data
from tasks.settings import Settings
from tasks.training import VariantJob, fit_and_register


@flow(name="train-variant", retries=2, retry_delay_seconds=10, log_prints=True)
def train_variant_flow(job: VariantJob) -> dict:
    settings = Settings.from_env()
    settings.apply()
    data = load_data(settings, job.data, job.data_digest)
    return asdict(fit_and_register(job, data, settings))
