"""The child flow: train one variant and seed on whichever worker picks it up.

It loads the data source the parent names (workers share nothing but object storage and
MLflow) and fails on data other than the parent's, at once: a retry would decode the same
bytes. Any other failure is retried, and the retry finds its checkpoint in object storage.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_client
from prefect.context import FlowRunContext

from tasks.data import DataMismatchError, load_data
from tasks.settings import Settings
from tasks.training import VariantJob, fit_and_register


@flow(name="train-variant", retries=2, retry_delay_seconds=10, log_prints=True)
def train_variant_flow(job: VariantJob) -> dict:
    settings = Settings.from_env()
    settings.apply()
    try:
        data = load_data(settings, job.data, job.data_digest)
    except DataMismatchError:
        _no_more_retries()
        raise
    return asdict(fit_and_register(job, data, settings))


def _no_more_retries() -> None:
    """The server retries a failed run while its policy allows: allow none for this one."""
    run = FlowRunContext.get().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, empirical_policy=run.empirical_policy.model_copy(
            update={"retries": 0}))
