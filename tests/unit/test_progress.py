"""Progress and machine-readable output without a run: the tracker's estimate of the time
left, the terminal bar it drives, shell completion, usage errors and strict JSON."""

from __future__ import annotations

import json
import logging

import pytest

from flows.cli import main
from flows.summary import print_json
from tasks import progress


def test_the_estimate_counts_only_the_epochs_timed_here(monkeypatch) -> None:
    clock = iter([100.0, 160.0, 220.0, 400.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    tracker = progress.Tracker("deep-seed0 epoch", 10)  # outside a run: no artifact
    tracker.update(5, "val acc 80.00%")  # resumed at epoch 4: one epoch in 60 s
    assert tracker.text == "deep-seed0 epoch 5/10, val acc 80.00%, about 5 min left"
    tracker.update(6)  # two epochs in 120 s
    assert tracker.text == "deep-seed0 epoch 6/10, about 4 min left"
    tracker.update(10)
    assert tracker.text == "deep-seed0 epoch 10/10, done"


def test_the_bar_follows_the_tracker_only_while_bars_show() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    assert progress.Tracker("jobs done", 2).bar is None
    # Prefect's log handler, whose console the bars share: its theme lacks the bar's styles.
    handler = PrefectConsoleHandler()
    # First among the root logger's handlers: an earlier test may have left another.
    logging.getLogger().handlers.insert(0, handler)
    try:
        with progress.terminal_bars(enabled=True):
            tracker = progress.Tracker("jobs done", 2)
            tracker.update(1)
            (task,) = progress._bars.tasks
            assert (task.completed, task.total) == (1, 2)
            assert progress._bars.console is handler.console
    finally:
        logging.getLogger().removeHandler(handler)
    assert progress._bars is None
    with progress.terminal_bars(enabled=False):
        assert progress._bars is None


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_prints_a_script_for_every_command(shell, capsys) -> None:
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert "cifar-pipeline" in script
    for word in ("train", "predict", "models", "--json", "--state-dir"):
        assert word in script, word


def test_a_usage_error_exits_2(capsys) -> None:
    for argv in (["models", "--no-such-option"], ["completion", "fish"], ["predict"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv
    assert main([]) == 2


def test_json_output_is_strict_json(capsys) -> None:
    print_json({"std": float("nan"), "n": [1, float("inf")]})
    text = capsys.readouterr().out
    assert json.loads(text, parse_constant=pytest.fail) == {"std": None, "n": [1, None]}
