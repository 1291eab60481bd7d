import hashlib
import json
import logging
import math
import threading
import time
import types

import pytest
import torch
from torch import nn

from model import checkpoint
from model.config import RECIPE_DEFAULTS, ConfigError, TrainConfig
from model.nets import ModifiedResNet, count_parameters
from model.optim import EMA_WARMUP, WarmupLinearDecay, WeightEMA
from model.predict import evaluate, to_device_images
from model.train import NonFiniteLossError, TrainingStopped, fit

DESIGN_KEYS = {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_seconds",
               "images_per_second", "epoch", "train_seconds", "eval_seconds"}
SMALL_WIDTHS = (8, 16, 32)
HOUR = 3600.0  # seconds


def cpu_config(recipe, **kw):
    base = dict(recipe=recipe, variant="light", device="cpu", workers=0, batch_size=32,
                checkpoint_seconds=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def small_net(request, monkeypatch):
    """fit() builds a narrow ResNet of the same shape: the same code path in a tenth of the
    time. A test marked `full_net` trains the real one."""
    if "full_net" in request.keywords:
        return
    import model.train as train_module

    monkeypatch.setattr(train_module, "build_model",
                        lambda variant: ModifiedResNet((1, 1, 1), widths=SMALL_WIDTHS))


# --- config -----------------------------------------------------------------------------


def test_recipe_defaults_fill_unset_fields_and_overrides_win():
    ref = TrainConfig(recipe="reference")
    assert (ref.epochs, ref.batch_size, ref.lr, ref.weight_decay) == (75, 128, 1e-3, 1e-4)
    assert ref.precision == "fp32" and ref.tta is False
    fast = TrainConfig(recipe="fast", epochs=3)
    assert fast.epochs == 3 and fast.batch_size == RECIPE_DEFAULTS["fast"]["batch_size"]
    assert fast.label_smoothing == 0.2


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"variant": "medium"}, "variant"),
        ({"recipe": "turbo"}, "recipe"),
        ({"epochs": -1}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": math.nan}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"device": "tpu:0"}, "device"),
        ({"optimiser": "adam"}, "optimiser"),
        ({"ema": -0.1}, "ema"),
        ({"ema": 1.0}, "ema"),
        ({"ema": math.nan}, "ema"),
    ],
)
def test_bad_config_is_rejected_with_the_field_named(kw, field):
    with pytest.raises((ConfigError, TypeError)) as info:  # TypeError: an unknown field
        TrainConfig(**kw)
    assert field in str(info.value)


def test_hash_ignores_speed_only_fields():
    a = TrainConfig(recipe="fast", device="cpu", workers=0)
    assert a.hash() == TrainConfig(recipe="fast", device="auto", workers=8, compile=True).hash()
    assert a.hash() != TrainConfig(recipe="fast", device="cpu", seed=1).hash()


def test_ema_is_off_by_default_and_off_leaves_the_hash_as_it_was():
    assert all(TrainConfig(recipe=r).ema == 0.0 for r in RECIPE_DEFAULTS)
    fast = TrainConfig(recipe="fast")
    # The hash of a config without the field (checkpoints written before it existed).
    payload = {k: v for k, v in fast.to_dict().items() if k in TrainConfig.HASHED_ALWAYS}
    old = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert fast.hash() == TrainConfig(recipe="fast", ema=0).hash() == old
    assert TrainConfig(recipe="fast", ema=0.99).hash() != old


def test_weight_ema_averages_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = WeightEMA(model, decay=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    expected = [p.clone() for p in start]
    for n in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            model.train()(torch.randn(8, 4))  # moves the batch-norm statistics
        ema.update()
        d = min(0.5, (1 + n) / (EMA_WARMUP + n))
        expected = [e + (1 - d) * (p.detach() - e) for e, p in zip(expected, model.parameters(),
                                                                   strict=True)]
    assert ema.updates == 3
    for avg, want, now in zip(ema.model.parameters(), expected, model.parameters(),
                              strict=True):
        torch.testing.assert_close(avg, want)
        assert not torch.equal(avg, now)  # an average, not a copy
    for avg, now in zip(ema.model.buffers(), model.buffers(), strict=True):
        assert torch.equal(avg, now)
    # The trained model's weights are its own: three steps of +1 from where they started.
    for p, s0 in zip(model.parameters(), start, strict=True):
        torch.testing.assert_close(p.detach(), s0 + 3)

    restored = WeightEMA(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3
    assert all(torch.equal(a, b) for a, b in zip(restored.model.state_dict().values(),
                                                 ema.model.state_dict().values(), strict=True))


def test_warmup_then_linear_decay():
    f = WarmupLinearDecay(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5) and f(12) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(4, 12))


# --- training ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.full_net
@pytest.mark.parametrize("recipe", ["reference", "paper", "fast"])
def test_each_recipe_trains_and_the_loss_falls(recipe, real_small):
    seen = []
    result = fit(cpu_config(recipe, epochs=2, batch_size=64), real_small,
                 on_epoch_end=seen.append)
    assert [int(m["epoch"]) for m in seen] == [0, 1]
    assert all(set(m) >= DESIGN_KEYS for m in seen)
    assert seen[1]["train/loss"] < seen[0]["train/loss"]
    assert 0 <= result.metrics["val/acc"] <= 1
    assert result.metrics["epochs"] == 2
    assert ("val/acc_tta" in result.metrics) == (recipe == "fast")
    assert not result.model.training


def test_the_fast_schedule_warms_up_then_decays(tiny):
    seen = []
    fit(cpu_config("fast", epochs=4, warmup_epochs=1), tiny, on_epoch_end=seen.append)
    lrs = [m["lr"] for m in seen]  # the rate in force at the end of each epoch
    assert lrs[0] == pytest.approx(0.2 * 32 / 512)  # peak, scaled to batch 32
    assert lrs[1] > lrs[2] > lrs[3] >= 0


@pytest.mark.parametrize(("recipe", "ema"), [
    # The report's PIL pipeline takes seconds even on this data.
    pytest.param("reference", 0.0, marks=pytest.mark.slow),
    ("paper", 0.0), ("fast", 0.0), ("fast", 0.9)])
def test_an_interrupted_run_resumes_to_exactly_the_same_weights(recipe, ema, tiny, tmp_path):
    config = cpu_config(recipe, epochs=3, ema=ema)
    straight = fit(config, tiny, checkpoint_dir=tmp_path / "a")

    class Preempted(Exception):
        pass

    def stop_after_first(metrics):
        if metrics["epoch"] == 0:
            raise Preempted

    with pytest.raises(Preempted):
        fit(config, tiny, on_epoch_end=stop_after_first, checkpoint_dir=tmp_path / "b")
    resumed = fit(config, tiny, checkpoint_dir=tmp_path / "b")

    assert resumed.resumed_from_epoch == 0
    assert [h["epoch"] for h in resumed.history] == [0.0, 1.0, 2.0]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for ha, hb in zip(straight.history, resumed.history, strict=True):
        assert ha["train/loss"] == hb["train/loss"] and ha["val/acc"] == hb["val/acc"]
        assert ha["val/loss"] == hb["val/loss"]
    # The whole final checkpoint, raw weights and their average alike.
    sa, sb = (checkpoint.load(tmp_path / d / checkpoint.CHECKPOINT_NAME) for d in "ab")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    if ema:
        assert sa["ema"]["updates"] == sb["ema"]["updates"] == 3 * 2  # 3 epochs of 2 steps
        ea, eb = sa["ema"]["model"], sb["ema"]["model"]
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    else:
        assert sa["ema"] is None and sb["ema"] is None


def test_should_stop_ends_fit_before_the_next_batch_as_an_interrupt(tiny, tmp_path):
    asked = []

    def stop_in_the_second_epoch() -> bool:
        asked.append(len(asked))
        return len(asked) == 3  # two batches an epoch: before the second epoch's first

    with pytest.raises(TrainingStopped) as info:
        fit(cpu_config("fast", epochs=2), tiny, checkpoint_dir=tmp_path,
            should_stop=stop_in_the_second_epoch)
    assert len(asked) == 3 and isinstance(info.value, KeyboardInterrupt)  # not a failure
    assert checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)["epoch"] == 0  # resumable


def test_with_ema_the_average_is_validated_and_returned(tiny, tmp_path):
    result = fit(cpu_config("fast", epochs=2, ema=0.9), tiny, checkpoint_dir=tmp_path)
    state = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    returned = result.model.state_dict()
    assert all(torch.equal(returned[k], v) for k, v in state["ema"]["model"].items())
    raw = state["model"]
    assert not all(torch.equal(returned[k], raw[k]) for k in raw)
    images = to_device_images(tiny.val.images, torch.device("cpu"))
    loss, acc = evaluate(result.model, images, torch.from_numpy(tiny.val.labels))
    assert result.history[-1]["val/loss"] == pytest.approx(float(loss))
    assert result.metrics["val/acc"] == pytest.approx(float(acc))
    assert result.metrics["params"] == count_parameters(result.model)
    assert not result.model.training


def test_a_finished_checkpoint_is_not_trained_again(tiny, tmp_path):
    config = cpu_config("fast", epochs=1)
    fit(config, tiny, checkpoint_dir=tmp_path)
    calls = []
    again = fit(config, tiny, on_epoch_end=calls.append, checkpoint_dir=tmp_path)
    assert calls == [] and again.resumed_from_epoch == 0 and len(again.history) == 1


def test_a_checkpoint_of_another_config_is_refused(tiny, tmp_path):
    fit(cpu_config("fast", epochs=1), tiny, checkpoint_dir=tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="another configuration"):
        fit(cpu_config("fast", epochs=1, seed=5), tiny, checkpoint_dir=tmp_path)


def test_checkpoint_holds_everything_needed_to_resume(tiny, tmp_path):
    fit(cpu_config("paper", epochs=1), tiny, checkpoint_dir=tmp_path)
    state = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config_hash",
            "config"} <= set(state)
    assert state["epoch"] == 0 and state["config"]["recipe"] == "paper"
    assert {"torch", "python", "numpy"} <= set(state["rng"])


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tiny, tmp_path, monkeypatch
):
    import model.train as train_module

    built = []
    monkeypatch.setattr(train_module, "build_model", lambda v: built.append(
        ModifiedResNet((1, 1, 1), widths=SMALL_WIDTHS)) or built[-1])

    def diverge(metrics):  # as if the weights blew up during epoch 1
        if metrics["epoch"] == 0:
            with torch.no_grad():
                next(built[0].parameters()).fill_(math.nan)

    with pytest.raises(NonFiniteLossError, match="epoch 1: training loss nan"):
        fit(cpu_config("fast", epochs=3), tiny, on_epoch_end=diverge, checkpoint_dir=tmp_path)
    state = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert state["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_empty_validation_split_is_refused(tiny):
    from model.data import Dataset, Split

    empty = Split(tiny.val.images[:0], tiny.val.labels[:0])
    data = Dataset(tiny.train, empty, None, tiny.classes, "x", "x")
    with pytest.raises(ValueError, match="validation split is empty"):
        fit(cpu_config("fast", epochs=1), data)


def test_slow_epochs_report_batch_progress(tiny, monkeypatch, caplog):
    import logging

    import model.train as train_module

    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="model.train"):
        fit(cpu_config("fast", epochs=1), tiny)
    lines = [r.getMessage() for r in caplog.records if r.name == "model.train"]
    assert lines == ["epoch 1/1: batch 1/2", "epoch 1/1: batch 2/2"]


# --- compilation ------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo(monkeypatch):
    """Compiled code of one test, and a compile failure it remembered, must not serve the
    next."""
    monkeypatch.setattr("model.optim.COMPILE_FAILURES", {})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording_aot_eager(graphs: list):
    """torch.compile's graph capture and AOT autograd (batch-norm buffer mutation,
    the backward graph) without code generation: what compile changes about a step's
    meaning, checkable on a CPU in seconds."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def compile_with(monkeypatch, backend) -> None:
    """torch.compile through `backend` instead of the inductor (which alone takes a mode)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, *, dynamic, mode: real(
        model, backend=backend, dynamic=dynamic))


def test_paper_and_fast_compile_on_cuda_by_default_and_a_setting_wins():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert TrainConfig(recipe="fast").compiles_on(cuda)
    assert TrainConfig(recipe="paper").compiles_on(cuda)
    assert not TrainConfig(recipe="fast").compiles_on(cpu)
    assert not TrainConfig(recipe="reference").compiles_on(cuda)
    assert not TrainConfig(recipe="fast", compile=False).compiles_on(cuda)
    assert TrainConfig(recipe="reference", compile=True).compiles_on(cpu)
    # Compilation changes speed, not the trajectory a checkpoint belongs to.
    assert (TrainConfig(recipe="fast", compile=True, compile_mode="reduce-overhead").hash()
            == TrainConfig(recipe="fast").hash())
    with pytest.raises(ConfigError, match="compile_mode"):
        TrainConfig(recipe="fast", compile_mode="fastest")


@pytest.mark.slow  # a few seconds of graph capture and AOT autograd
def test_a_compiled_step_trains_like_the_eager_one(tiny, monkeypatch, fresh_dynamo):
    eager = fit(cpu_config("fast", epochs=2), tiny)
    graphs: list = []
    compile_with(monkeypatch, recording_aot_eager(graphs))
    compiled = fit(cpu_config("fast", epochs=2, compile=True), tiny)

    assert graphs, "the training step never went through the compiler"
    assert compiled.metrics["compiled"] == 1.0 and eager.metrics["compiled"] == 0.0
    assert compiled.metrics["compile_seconds"] > 0 == eager.metrics["compile_seconds"]
    a, b = eager.model.state_dict(), compiled.model.state_dict()
    # The warm-up batch moved no statistics: as many batch-norm updates as eager.
    counts = [k for k in a if k.endswith("num_batches_tracked")]
    assert counts and all(torch.equal(a[k], b[k]) for k in counts)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    for he, hc in zip(eager.history, compiled.history, strict=True):
        assert hc["train/loss"] == pytest.approx(he["train/loss"], rel=1e-4)
        assert hc["val/loss"] == pytest.approx(he["val/loss"], rel=1e-4)


def test_a_failing_compile_falls_back_to_eager_training(tiny, monkeypatch, caplog,
                                                        fresh_dynamo):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    eager = fit(cpu_config("fast", epochs=1), tiny)
    compile_with(monkeypatch, broken)
    with caplog.at_level(logging.WARNING, logger="model.train"):
        result = fit(cpu_config("fast", epochs=1, compile=True), tiny)
    assert "training eager instead" in caplog.text
    assert "no C++ compiler on this machine" in caplog.text
    assert result.metrics["compiled"] == 0.0 and result.metrics["compile_fallback"] == 1.0
    # The failed attempt left no trace: the very weights of an eager run.
    a, b = eager.model.state_dict(), result.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.full_net
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_on_cuda_the_inductor_step_trains_like_the_eager_one(mode, fresh_dynamo):
    from model.measure import synthetic_dataset

    data = synthetic_dataset(2048, 512)
    config = dict(recipe="fast", variant="light", device="cuda", batch_size=256, epochs=3)
    eager = fit(TrainConfig(**config, compile=False), data)
    compiled = fit(TrainConfig(**config, compile=True, compile_mode=mode), data)
    assert compiled.metrics["compiled"] == 1.0
    # bf16 kernels differ in rounding; the runs must still learn the same thing.
    for he, hc in zip(eager.history, compiled.history, strict=True):
        assert hc["train/loss"] == pytest.approx(he["train/loss"], rel=0.05, abs=0.02)
    assert abs(compiled.metrics["val/acc"] - eager.metrics["val/acc"]) <= 0.03


def test_compile_builds_a_static_graph(tiny, monkeypatch, fresh_dynamo):
    seen = {}
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        seen.update(kwargs)
        return real_compile(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", recording_compile)
    fit(cpu_config("fast", epochs=1, compile=True), tiny)
    # Batch sizes are fixed per run: no symbolic batch dimension, no recompiles.
    assert seen["dynamic"] is False


def test_a_failure_at_the_third_warm_up_step_falls_back_to_eager(tiny, monkeypatch, caplog,
                                                                 fresh_dynamo):
    """CUDA-graph capture happens on the steps after the first: the warm-up runs them before
    the timed training, and a failure there trains eager, as if never compiled."""
    calls = []

    def fails_on_third_call(model, **kwargs):
        def step(x):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("CUDA graph capture failed")
            return model(x)

        return step

    eager = fit(cpu_config("fast", epochs=1), tiny)
    monkeypatch.setattr(torch, "compile", fails_on_third_call)
    with caplog.at_level(logging.WARNING, logger="model.train"):
        result = fit(cpu_config("fast", epochs=1, compile=True), tiny)
    assert len(calls) == 3  # three warm-up steps; training never called the compiled step
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDA graph capture failed" in warnings[0].getMessage()
    assert result.metrics["compile_fallback"] == 1.0 and result.metrics["compiled"] == 0.0
    a, b = eager.model.state_dict(), result.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_and_evaluation_are_timed_apart(tiny, monkeypatch):
    """Evaluation moves fit's clock on by an hour: all of it must land in eval_seconds,
    none in train_seconds (which a few CPU steps keep far below an hour)."""
    import model.train as train_module

    real_evaluate, offset = train_module.evaluate, [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0])

    def slow_evaluate(*args, **kwargs):
        offset[0] += HOUR
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(train_module, "evaluate", slow_evaluate)
    result = fit(cpu_config("fast", epochs=2), tiny)
    for h in result.history:
        assert h["eval_seconds"] >= HOUR > 10 * h["train_seconds"]  # evaluation lands apart
        assert h["epoch_seconds"] == pytest.approx(h["train_seconds"] + h["eval_seconds"])
        assert h["images_per_second"] == pytest.approx(64 / h["train_seconds"])
    assert result.metrics["train_seconds"] == pytest.approx(
        sum(h["train_seconds"] for h in result.history))
    assert result.metrics["eval_seconds"] >= 2 * HOUR


def test_checkpoints_follow_the_interval_and_the_last_epoch(tiny, tmp_path):
    written = []
    result = fit(cpu_config("fast", epochs=3, checkpoint_seconds=3600), tiny,
                 checkpoint_dir=tmp_path, on_checkpoint=lambda p: written.append(
                     (checkpoint.load(p)["epoch"], threading.current_thread().name)))
    # Only the last epoch: an hour never passed. Written and handed over off this thread.
    assert [epoch for epoch, _ in written] == [2]
    assert all(name != threading.current_thread().name for _, name in written)
    assert result.metrics["checkpoint_seconds"] >= 0

    every = []
    fit(cpu_config("fast", epochs=3), tiny, checkpoint_dir=tmp_path / "every",
        on_checkpoint=lambda p: every.append(checkpoint.load(p)["epoch"]))
    assert every == [0, 1, 2]


def test_a_failed_checkpoint_upload_fails_the_run(tiny, tmp_path):
    def upload(path):
        raise OSError("the object store refused the upload")

    with pytest.raises(OSError, match="refused the upload"):
        fit(cpu_config("fast", epochs=2), tiny, checkpoint_dir=tmp_path, on_checkpoint=upload)


def test_checkpoint_time_lost_is_measured(tiny, tmp_path):
    def slow_upload(path):
        time.sleep(0.5)

    result = fit(cpu_config("fast", epochs=1), tiny, checkpoint_dir=tmp_path,
                 on_checkpoint=slow_upload)
    # The last checkpoint is waited for before fit returns, and that wait is counted.
    assert result.metrics["checkpoint_seconds"] >= 0.5


def test_fast_decays_conv_weights_only_and_the_report_decays_everything():
    from model.optim import parameter_groups

    net = ModifiedResNet((1, 1, 1), widths=SMALL_WIDTHS)
    decayed, free = parameter_groups(net, TrainConfig(recipe="fast"))
    assert decayed["weight_decay"] == 5e-4 and free["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in free["params"])
    assert len(decayed["params"]) + len(free["params"]) == len(list(net.parameters()))
    (everything,) = parameter_groups(net, TrainConfig(recipe="reference"))
    assert len(everything["params"]) == len(list(net.parameters()))


def test_fast_warm_up_scales_with_the_budget_unless_set():
    assert TrainConfig(recipe="fast").warmup_epochs == 2.0  # 5% of 40
    assert TrainConfig(recipe="fast", epochs=120).warmup_epochs == 6.0
    assert TrainConfig(recipe="fast", epochs=120, warmup_epochs=1).warmup_epochs == 1.0
    assert TrainConfig(recipe="paper").warmup_epochs == 0.0


def test_the_reference_loader_keeps_the_old_order_and_ignores_worker_count(tiny):
    """Persistent workers, pinned memory: the same data order as one DataLoader per epoch,
    and each image's augmentation seeded by (seed, epoch, index), so batches do not depend
    on how many workers made them."""
    from model import reference_pipeline
    from model.loaders import ReferenceLoader, epoch_seed

    cpu = torch.device("cpu")
    dataset = reference_pipeline.PILDataset(tiny.train.images, tiny.train.labels,
                                            reference_pipeline.reference_transform(train=True))
    old = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True, num_workers=0,
                                      generator=torch.Generator().manual_seed(epoch_seed(3, 1)))
    old_labels = torch.cat([y for _, y in old])
    loaders = [ReferenceLoader(tiny.train, cpu, 16, seed=3, workers=w) for w in (0, 2)]
    try:
        for epoch in (0, 1):
            batches = [list(loader.epoch(epoch)) for loader in loaders]
            for (xa, ya), (xb, yb) in zip(*batches, strict=True):
                assert torch.equal(ya, yb) and torch.equal(xa, xb)
        assert torch.equal(torch.cat([y for _, y in batches[0]]), old_labels)
        assert loaders[1].loader.persistent_workers
    finally:
        for loader in loaders:
            loader.close()
