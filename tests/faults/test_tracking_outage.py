"""MLflow going away during training: metrics are buffered and delivered in order when it
is back, or the run fails with a clear message before anything is registered."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.metrics import MetricSink, TrackingUnavailableError


class FlakyClient:
    """Refuses `log_batch` while `down` is set, like a stopped tracking server."""

    def __init__(self, down: bool = False):
        self.down = threading.Event()
        if down:
            self.down.set()
        self.delivered: list[tuple[str, float, int]] = []
        self.refused = 0

    def log_batch(self, run_id, metrics):
        if self.down.is_set():
            self.refused += 1
            raise ConnectionError("Connection refused: 127.0.0.1:5000")
        self.delivered += [(m.key, m.value, m.step) for m in metrics]


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not true within {timeout} s"
        time.sleep(0.005)


def test_metrics_logged_while_the_server_is_down_arrive_in_order_once_it_is_back():
    client = FlakyClient(down=True)
    sink = MetricSink(client, "run", backoff=0.01)
    started = time.monotonic()
    for epoch in range(5):
        sink.log({"val/acc": epoch / 10, "train/loss": 2.0 - epoch / 10}, step=epoch)
    # Training was never held up by the outage.
    assert time.monotonic() - started < 0.5
    wait_until(lambda: client.refused >= 1)  # the sender tried, and was refused
    assert client.delivered == [] and sink.backlog == 10
    client.down.clear()
    sink.close(timeout=10)
    assert [(k, s) for k, _, s in client.delivered if k == "val/acc"] == [
        ("val/acc", e) for e in range(5)]
    assert len(client.delivered) == 10 and sink.backlog == 0


def test_a_server_that_stays_away_fails_the_run_with_a_clear_message():
    sink = MetricSink(FlakyClient(down=True), "run-123", backoff=0.01)
    sink.log({"val/acc": 0.5}, step=0)
    with pytest.raises(TrackingUnavailableError, match=r"did not accept 1 buffered metric.*"
                       r"run-123.*Connection refused.*rerun with the same run key"):
        sink.close(timeout=0.3)


def test_large_backlogs_are_sent_in_batches_mlflow_accepts():
    sizes = []

    class Recording(FlakyClient):
        def log_batch(self, run_id, metrics):
            sizes.append(len(metrics))
            super().log_batch(run_id, metrics)

    client = Recording(down=True)
    sink = MetricSink(client, "run", backoff=0.01)
    for step in range(250):
        sink.log({f"m{i}": i for i in range(10)}, step=step)
    client.down.clear()
    sink.close(timeout=10)
    assert len(client.delivered) == 2500
    assert max(sizes) <= 1000
