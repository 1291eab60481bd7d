"""MLflow runs that end without hiding why they ended.

`mlflow.start_run` used as a context manager records the run's end on the tracking server
when the block exits. If the block failed because that server is unreachable, recording
the end fails too, and its exception replaces the one that says what went wrong.
`tracked_run` keeps the original error and only warns that the run's status could not be
recorded (the run then reads RUNNING until someone ends it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow.entities import RunStatus

log = logging.getLogger(__name__)


@contextmanager
def tracked_run(**start_kwargs: Any) -> Iterator[mlflow.ActiveRun]:
    """`mlflow.start_run(**start_kwargs)`; ends the run FINISHED or FAILED."""
    run = mlflow.start_run(**start_kwargs)
    try:
        yield run
    except BaseException:
        try:
            mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        except Exception as exc:  # the failure being raised is the news, not this one
            log.warning("could not mark MLflow run %s failed: %s", run.info.run_id, exc)
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
