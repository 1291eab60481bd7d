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
from model.train import BUDGET_PROBE_EPOCHS, TrainingStopped, fit


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


def test_the_whole_step_graph_is_a_paper_option_and_enters_the_hash_only_when_set():
    from model.config import ConfigError

    plain = TrainConfig(recipe="paper", epochs=2)
    assert TrainConfig(recipe="paper", epochs=2, cuda_graph=False).hash() == plain.hash()
    assert TrainConfig(recipe="paper", epochs=2, cuda_graph=True).hash() != plain.hash()
    for bad in [dict(recipe="fast"), dict(recipe="reference"),
                dict(recipe="paper", compile_mode="reduce-overhead"),
                dict(recipe="paper", compile_mode="max-autotune")]:
        with pytest.raises(ConfigError, match="cuda_graph: only for the paper recipe"):
            TrainConfig(**bad, cuda_graph=True)
    TrainConfig(recipe="paper", compile_mode="max-autotune-no-cudagraphs", cuda_graph=True)


def test_on_a_cpu_the_whole_step_graph_trains_the_plain_step_and_says_so(tiny, caplog):
    config = cpu_config(recipe="paper", epochs=1)
    with caplog.at_level(logging.WARNING, logger="model.train"):
        graphed = fit(config.replace(cuda_graph=True), tiny)
    assert "cuda_graph needs a CUDA device: training on cpu without it" in caplog.text
    assert graphed.metrics["cuda_graph"] == 0.0
    plain = fit(config, tiny)
    assert "cuda_graph" not in plain.metrics
    a, b = plain.model.state_dict(), graphed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_capturing_the_whole_step_leaves_the_weights_and_adams_state_as_they_were():
    from model.loaders import make_loader
    from model.measure import synthetic_dataset

    data = synthetic_dataset(512, 64)
    config = TrainConfig(recipe="paper", device="cuda", batch_size=64, epochs=1, cuda_graph=True)
    model = small_net().cuda().to(memory_format=torch.channels_last)
    loader = make_loader(config, data.train, torch.device("cuda"))
    optimizer, _, _ = optim.make_optimizer(config, model, loader.steps_per_epoch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphed = optim.GraphedStep(model, nn.CrossEntropyLoss(), optimizer, loader, bf16=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not v.any() for state in optimizer.state.values() for v in state.values())
    first = next(model.parameters())
    untrained = first.detach().clone()
    batches = list(graphed.steps(0, loader.order(0)[1]))
    assert len(batches) == 512 // 64 and all(n == 64 for _, _, n in batches)
    assert not torch.equal(first, untrained)  # the replays trained it


@pytest.mark.gpu
@pytest.mark.full_net
@needs_cuda
@pytest.mark.parametrize("compile_", [False, True])
def test_on_cuda_the_whole_step_graph_trains_like_the_plain_step_and_resumes(
        compile_, tmp_path, monkeypatch):
    from model.measure import synthetic_dataset

    monkeypatch.undo()  # the report's network
    data = synthetic_dataset(2048, 512)
    config = TrainConfig(recipe="paper", variant="light", device="cuda", batch_size=256,
                         epochs=3, compile=compile_, checkpoint_seconds=0)
    plain = fit(config, data)
    graphed = fit(config.replace(cuda_graph=True), data)
    assert (graphed.metrics["cuda_graph"], graphed.metrics["compile_fallback"]) == (1.0, 0.0)
    # Other augmentation draws and bf16 rounding; the runs must still learn the same thing.
    for hp, hg in zip(plain.history, graphed.history, strict=True):
        assert hg["train/loss"] == pytest.approx(hp["train/loss"], rel=0.1, abs=0.05)
    assert abs(graphed.metrics["val/acc"] - plain.metrics["val/acc"]) <= 0.05
    # Stopped after its first epoch, a graphed run resumes from its checkpoint and captures
    # the step again.
    epochs_done = []
    with pytest.raises(TrainingStopped):
        fit(config.replace(cuda_graph=True), data, on_epoch_end=epochs_done.append,
            checkpoint_dir=tmp_path, should_stop=lambda: bool(epochs_done))
    resumed = fit(config.replace(cuda_graph=True), data, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 0 and resumed.metrics["cuda_graph"] == 1.0
    assert len(resumed.history) == 3
