"""Progress where users look: a progress artifact on the Prefect run page, and a rich bar
on the terminal while the command line shows bars (only on a TTY, never on stdout)."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

import numpy as np

_bars = None  # the command line's rich Progress while it shows bars; None otherwise
PREDICT_CHUNK = 2048  # images between two advances of a prediction bar


@contextmanager
def terminal_bars(enabled: bool | None = None):
    """Bars on stderr while inside, when it is a terminal (or `enabled`). They share the
    console of Prefect's log handler, so that log lines print above them, not through."""
    global _bars
    if not (sys.stderr.isatty() if enabled is None else enabled) or _bars is not None:
        yield
        return
    from rich.console import Console
    from rich.default_styles import DEFAULT_STYLES
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    from rich.theme import Theme

    console = next((h.console for h in logging.getLogger().handlers  # Prefect's, if set up
                    if isinstance(getattr(h, "console", None), Console)), Console(stderr=True))
    console.push_theme(Theme(DEFAULT_STYLES))  # Prefect's theme has only its own styles
    try:
        with Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console) as bars:
            _bars = bars
            yield
    finally:
        _bars = None
        console.pop_theme()


class Tracker:
    """`done` of `total` steps: a progress artifact (inside a flow or task run) whose
    description says where it is and about how long is left, and a terminal bar."""

    def __init__(self, label: str, total: int, key: str | None = None):
        self.label, self.total, self.started = label, max(total, 1), time.monotonic()
        self.artifact_id = None
        self.steps: tuple[int, float] | None = None  # (first done, its time)
        context = sys.modules.get("prefect.context")  # no Prefect import where none runs
        if context and (context.FlowRunContext.get() or context.TaskRunContext.get()):
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(0.0, key=key,
                                                        description=f"{label} 0/{total}")
        self.bar = _bars.add_task(label, total=total) if _bars is not None else None

    def update(self, done: int, detail: str = "") -> None:
        now = time.monotonic()
        if self.steps is None:  # a resumed run starts part way: time from here on
            self.steps = (done - 1, self.started)
        first, since = self.steps
        left = (self.total - done) * (now - since) / max(done - first, 1)
        self.text = text = f"{self.label} {done}/{self.total}{', ' + detail if detail else ''}" + (
            f", about {_duration(left)} left" if done < self.total else ", done")
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            try:  # a busy API costs the page an update, never the run
                update_progress_artifact(self.artifact_id, 100 * done / self.total, text)
            except Exception as exc:
                logging.getLogger(__name__).warning("progress not updated: %s", exc)
        if self.bar is not None:
            _bars.update(self.bar, completed=done,
                         description=f"{self.label}{f' ({detail})' if detail else ''}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def predict_with_bar(network, images: np.ndarray, label: str, **kwargs):
    """model.predict.predict, in chunks that advance a terminal bar while one shows."""
    from model.predict import inference_model, predict

    if _bars is None:
        return predict(network, images, **kwargs)
    net = inference_model(network, kwargs.pop("device", None))  # once, not per chunk
    tracker, parts = Tracker(label, len(images)), []
    for start in range(0, len(images), PREDICT_CHUNK):
        parts.append(predict(net, images[start:start + PREDICT_CHUNK], fuse=False, **kwargs))
        tracker.update(min(start + PREDICT_CHUNK, len(images)))
    if not parts:
        return predict(net, images, fuse=False, **kwargs)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
