"""One retry policy for every task that touches object storage: transient errors are
retried, permanent ones (a missing object, bad data, a conflicting write) never are."""

from __future__ import annotations

from model.data import InvalidInputError, SourceUnavailableError
from tasks.storage import MissingObjectError, ObjectExistsError, StorageError


def is_transient(exc: BaseException) -> bool:
    """Whether retrying can help: the store or the data source failed in transit."""
    if isinstance(exc, MissingObjectError | ObjectExistsError):
        return False
    if isinstance(exc, SourceUnavailableError):
        return True
    if isinstance(exc, InvalidInputError):
        return False
    return isinstance(exc, StorageError)


def _retry_condition(task, run, state) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


# Two retries, 2 s then 10 s apart: long enough for a throttled or restarting endpoint.
TRANSIENT_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10],
                         retry_condition_fn=_retry_condition)
