"""The command line's interrupt guard in this process: the first SIGINT or SIGTERM raises
`Interrupted` in the main thread and the command's line says how to resume; while a flow
runs, Prefect's engine takes SIGTERM first and must hand it on to the guard afterwards.
The real command, signalled mid-epoch, is tests/faults/test_interrupts.py."""

from __future__ import annotations

import os
import signal
import time

import pytest
from prefect.exceptions import TerminationSignal
from prefect.utilities.engine import capture_sigterm

from flows.interrupts import Interrupted, InterruptGuard, interrupted_line, resume_command

RESUME = "cifar-pipeline train --run-key k"


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(2)  # the handler raises before this ends


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_raises_and_the_line_says_how_to_resume(signum, capsys):
    before = signal.getsignal(signum)
    guard = InterruptGuard(lambda g: interrupted_line(g, "train", RESUME), owns_process=False)
    with guard:
        with pytest.raises(Interrupted) as info:
            _signal_self(signum)
        os.kill(os.getpid(), signum)  # a second one, in a caller's process: no new raise
        assert guard.interrupted(info.value) == 128 + signum
    assert signal.getsignal(signum) is before
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == (
        f"interrupted by {name}: `train` stopped; resume from its last checkpoint with: "
        f"{RESUME}\n")


def test_prefect_hands_sigterm_on_once_its_flow_run_scope_ends():
    """The guard hears a SIGTERM that comes during a flow run only because Prefect's engine,
    after raising its own TerminationSignal, sends the signal again to the handler it had
    replaced. Should a Prefect release stop doing so, SIGTERM would end the command with a
    traceback: this fails first."""
    guard = InterruptGuard(lambda g: "", owns_process=False)
    with guard, pytest.raises(Interrupted) as info, capture_sigterm():
        _signal_self(signal.SIGTERM)
    assert info.value.signum == signal.SIGTERM
    assert isinstance(info.value.__context__, TerminationSignal)


def test_the_resume_command_adds_the_state_dir_and_run_key_once(tmp_path):
    assert resume_command(["train", "--epochs", "3"], tmp_path, "k1") == (
        f"cifar-pipeline --state-dir {tmp_path} train --epochs 3 --run-key k1")
    given = ["--state-dir=s", "run", "--run-key", "k0"]
    assert resume_command(given, tmp_path, "k1") == "cifar-pipeline --state-dir=s run --run-key k0"
