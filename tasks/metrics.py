"""Per-epoch metrics to MLflow from a background thread, so that training never waits on a
restarting tracking server: a sender thread delivers them in order and retries with
backoff; `flush` raises `TrackingUnavailableError` if the backlog outlives its deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mlflow.entities import Metric

from model.errors import UserError

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
MAX_BACKOFF_SECONDS = 30.0


class TrackingUnavailableError(UserError, RuntimeError):
    """The tracking server did not take the buffered metrics before the deadline."""

    resumable = True


class MetricSink:
    def __init__(self, client, run_id: str, *,
                 on_error: Callable[[Exception], None] | None = None, backoff: float = 1.0):
        self.client, self.run_id = client, run_id
        self.on_error = on_error or (lambda exc: None)
        self.backoff = backoff
        self._pending: list[Metric] = []
        self._cond = threading.Condition()
        self._closed = False
        self._last_error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        with self._cond:
            self._pending.extend(batch)
            self._cond.notify()

    @property
    def backlog(self) -> int:
        with self._cond:
            return len(self._pending)

    def flush(self, timeout: float = 300.0) -> None:
        """Wait until every metric is delivered; raise if that takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()
            while self._pending and time.monotonic() < deadline:
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if self._pending:
                raise TrackingUnavailableError(
                    f"the MLflow tracking server did not accept {len(self._pending)} buffered "
                    f"metric values for run {self.run_id} within {timeout:.0f} s (last error: "
                    f"{self._last_error}); the run is failed rather than registered with gaps. "
                    "The checkpoint is kept: rerun with the same run key once it is back"
                )

    def close(self, timeout: float = 300.0) -> None:
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify()
            self._thread.join(timeout=5)

    def _run(self) -> None:
        delay = self.backoff
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed and not self._pending:
                    return
                batch = self._pending[:MAX_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # any failure to deliver is retried; never lost
                self._last_error = exc
                self.on_error(exc)
                with self._cond:
                    if self._closed:
                        return
                    self._cond.wait(timeout=delay)
                delay = min(MAX_BACKOFF_SECONDS, delay * 2)
                continue
            delay = self.backoff
            with self._cond:
                del self._pending[: len(batch)]
                self._cond.notify_all()
