"""MLflow runs that end without hiding why they ended, and never stay RUNNING.

If a block inside `mlflow.start_run` fails because the tracking server is unreachable,
recording the run's end fails too and its exception replaces the one that says what went
wrong; `tracked_run` keeps the original error and only warns. A failed run also drops the
models it had not finished logging, so a truncated weights file never looks like a model.
An interrupt ends the run KILLED; `end_open_runs` ends what a forced exit left open.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus, RunStatus

log = logging.getLogger(__name__)

_open_runs: dict[str, str] = {}  # run id -> tracking URI, of runs begun and not yet ended
_open_lock = threading.Lock()


@contextmanager
def tracked_run(**start_kwargs: Any) -> Iterator[mlflow.ActiveRun]:
    """`mlflow.start_run(**start_kwargs)`; ends the run FINISHED, FAILED or KILLED."""
    run = mlflow.start_run(**start_kwargs)
    run_id = run.info.run_id
    with _open_lock:
        _open_runs[run_id] = mlflow.get_tracking_uri()
    try:
        yield run
    except BaseException as exc:
        # Exception: a failure; anything else (KeyboardInterrupt, SystemExit, Prefect's
        # TerminationSignal) is the process being stopped.
        status = RunStatus.FAILED if isinstance(exc, Exception) else RunStatus.KILLED
        try:
            discard_unfinished_models(run)
            mlflow.end_run(RunStatus.to_string(status))
        except Exception as end_exc:  # the failure being raised is the news, not this one
            log.warning("could not mark MLflow run %s %s: %s", run_id,
                        RunStatus.to_string(status), end_exc)
        raise
    finally:
        with _open_lock:
            _open_runs.pop(run_id, None)
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def discard_unfinished_models(run: mlflow.ActiveRun) -> None:
    """Delete the models `run` began to log and did not finish (not READY), with their
    files. The run's models are known in memory, so a run that logged none costs no
    request to a tracking server that may be the reason it failed."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    outputs = run.outputs.model_outputs if run.outputs else []
    client = mlflow.MlflowClient()
    for output in outputs:
        model = client.get_logged_model(output.model_id)
        if model.status == LoggedModelStatus.READY:
            continue
        if model.artifact_location:
            try:
                get_artifact_repository(model.artifact_location).delete_artifacts()
            except Exception as exc:  # the model is still marked deleted below
                log.warning("could not delete the files of unfinished model %s: %s",
                            model.model_id, exc)
        client.delete_logged_model(model.model_id)


def end_open_runs(status: str = "KILLED") -> None:
    """End every run that `tracked_run` opened in this process and has not ended: for a
    command that must exit before its own code could end them."""
    with _open_lock:
        runs = dict(_open_runs)
    for run_id, uri in runs.items():
        try:
            client = mlflow.MlflowClient(tracking_uri=uri)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
        except Exception as exc:
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)


def run_links(info, artifact: str) -> tuple[str, str]:
    """(the run's page, one of its artifacts) for a browser: the tracking server's pages,
    or, with the embedded store, where the run's files lie."""
    from urllib.parse import quote

    from model.data.uri import redact

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        base = redact(uri).rstrip("/")
        return (f"{base}/#/experiments/{info.experiment_id}/runs/{info.run_id}",
                f"{base}/get-artifact?path={quote(artifact)}&run_uuid={info.run_id}")
    return info.artifact_uri, f"{info.artifact_uri}/{artifact}"
