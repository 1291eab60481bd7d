"""The training step as the GPU check relies on it: the compile warm-up runs the loop's own
step, a failed compile is not retried, recompiles come from torch's counters, the reference
pipeline's seeding is cheap, and a time budget sizes the run."""

import logging
import time
import weakref

import pytest
import torch
from torch import nn

from model import optim
from model.config import TrainConfig
from model.measure import train_row
from model.nets import ModifiedResNet
from model.optim import COMPILE_WARMUP_STEPS
from model.train import BUDGET_PROBE_EPOCHS, fit


def cpu_config(**kw) -> TrainConfig:
    base = dict(recipe="fast", variant="light", device="cpu", workers=0, batch_size=32,
                checkpoint_seconds=0, epochs=1)
    return TrainConfig(**{**base, **kw})


def small_net(variant=None) -> nn.Module:
    return ModifiedResNet((1, 1, 1), widths=(8, 16, 32))


@pytest.fixture(autouse=True)
def small_and_fresh(monkeypatch):
    """A narrow ResNet of the report's layout, and no compiled code or remembered compile
    failure left from another test."""
    monkeypatch.setattr("model.train.build_model", small_net)
    monkeypatch.setattr("model.optim.COMPILE_FAILURES", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_warm_up_runs_the_loops_own_step_keeping_its_outputs_alive(tiny, monkeypatch):
    """With CUDA graphs, a step whose last outputs are still alive records anew: the
    warm-up must hold them as the timed loop does, or the recording lands in the loop."""
    previous_alive, last = [], [lambda: None]

    def compile_(model, **kwargs):
        def step(x):
            previous_alive.append(last[0]() is not None)
            out = model(x)
            last[0] = weakref.ref(out)
            return out
        return step

    monkeypatch.setattr(torch, "compile", compile_)
    result = fit(cpu_config(compile=True), tiny)
    steps = len(tiny.train) // 32
    assert result.metrics["compiled"] == 1.0
    assert len(previous_alive) == COMPILE_WARMUP_STEPS + steps
    # Each step after the first, in the warm-up and in the loop alike, sees the last one's
    # output still held.
    assert previous_alive == ([False] + [True] * (COMPILE_WARMUP_STEPS - 1)
                              + [False] + [True] * (steps - 1))


def test_a_failed_compile_is_not_tried_again_in_the_same_process(tiny, monkeypatch, caplog):
    tries = []

    def broken(model, **kwargs):
        tries.append(1)
        raise RuntimeError("Triton has no kernel for this GPU")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="model.train"):
        first = fit(cpu_config(compile=True), tiny)
        second = fit(cpu_config(compile=True, variant="deep"), tiny)
    assert len(tries) == 1
    for result in (first, second):
        assert result.metrics["compiled"] == 0.0 and result.metrics["compile_fallback"] == 1.0
    assert "failed earlier in this process" in caplog.records[-1].getMessage()
    assert "Triton has no kernel" in caplog.records[-1].getMessage()
    # Remembered for this device type and mode only: another mode is tried.
    assert list(optim.COMPILE_FAILURES) == [("cpu", "default")]


FLAGS = {"second_epoch": False}


class Guarded(nn.Module):
    """Reads a global flag, so that dynamo guards on it: flipping it recompiles."""

    def __init__(self):
        super().__init__()
        self.net = small_net()

    def forward(self, x):
        return self.net(x) * (2.0 if FLAGS["second_epoch"] else 1.0)


@pytest.mark.slow  # two compiles, seconds each
def test_recompiles_are_counted_from_torchs_counters_even_with_torch_logs_set(
        tiny, monkeypatch):
    monkeypatch.setenv("TORCH_LOGS", "graph_breaks")  # torch ignores set_logs() then
    monkeypatch.setitem(FLAGS, "second_epoch", False)
    monkeypatch.setattr("model.train.build_model", lambda variant: Guarded())
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, *, dynamic, mode: real(
        model, backend="eager", dynamic=dynamic))

    def flip(metrics):
        FLAGS["second_epoch"] = True

    config = cpu_config(compile=True, epochs=2)
    monkeypatch.setattr("model.measure.fit",
                        lambda config, data, on_epoch_end: fit(config, data, on_epoch_end=flip))
    row = train_row(config, tiny, torch.device("cpu"))
    assert row.compiled and row.recompiles == 1 and row.cudagraph_skips == 0


def test_the_reference_pipeline_seeds_only_torchs_cpu_generator(tiny, monkeypatch):
    """`torch.manual_seed` (every device's generator) inside `fork_rng` cost a tenth of the
    transforms' time; the transforms draw from the CPU generator alone."""
    from model.loaders import ReferenceLoader

    cpu = torch.device("cpu")

    def batches():
        loader = ReferenceLoader(tiny.train, cpu, 16, seed=3, workers=0)
        try:
            return list(loader.epoch(1))
        finally:
            loader.close()

    expected = batches()

    def forbidden(*args, **kwargs):
        raise AssertionError("seeds more than the CPU generator")

    monkeypatch.setattr(torch, "manual_seed", forbidden)
    monkeypatch.setattr(torch.random, "fork_rng", forbidden)
    torch.default_generator.manual_seed(12345)  # what came before does not matter
    for (xa, ya), (xb, yb) in zip(expected, batches(), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_budget_spent_by_the_first_epochs_ends_the_run_there(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="model.train"):
        result = fit(cpu_config(epochs=40, time_budget_seconds=1e-3), tiny)
    assert len(result.history) == BUDGET_PROBE_EPOCHS
    assert [h.get("planned_epochs") for h in result.history] == [None] * (
        BUDGET_PROBE_EPOCHS - 1) + [BUDGET_PROBE_EPOCHS]
    assert f"time budget 0 s: {BUDGET_PROBE_EPOCHS} epochs" in caplog.text


def test_the_time_budget_is_a_training_option_of_the_command_line_and_the_form():
    from flows.config import TrainResnetsConfig

    form = TrainResnetsConfig(time_budget_seconds=600)
    assert form.training_configs()[0].time_budget_seconds == 600
    with pytest.raises(ValueError, match="time_budget_seconds"):
        TrainConfig(time_budget_seconds=0)


@pytest.mark.slow  # a minute of training
def test_a_minute_budget_ends_the_whole_run_within_ten_percent_of_it():
    from model.measure import synthetic_dataset

    # Epochs of a fraction of a second (a few on a busy machine): the run can end within a
    # tenth of the budget only if each epoch is well under that.
    data = synthetic_dataset(64, 32)
    started = time.perf_counter()
    result = fit(cpu_config(epochs=40, time_budget_seconds=60.0), data)
    seconds = time.perf_counter() - started
    assert 54.0 <= seconds <= 66.0
    assert result.history[-1]["planned_epochs"] == len(result.history) > BUDGET_PROBE_EPOCHS
    # The decay was sized to the epochs chosen: the last one runs near a rate of zero (not
    # exactly: on a busy machine the last choice can come during the last epoch), where
    # the 40 epochs asked for would have left it near half its peak.
    assert result.history[-1]["lr"] < 0.05 * max(h["lr"] for h in result.history)
