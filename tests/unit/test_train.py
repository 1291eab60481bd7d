import math

import pytest
import torch
from pydantic import ValidationError

from model import checkpoint
from model.train import (
    RECIPE_DEFAULTS,
    NonFiniteLossError,
    TrainConfig,
    WarmupLinearDecay,
    fit,
)

DESIGN_KEYS = {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_seconds",
               "images_per_second", "epoch"}


def cpu_config(recipe, **kw):
    base = dict(recipe=recipe, variant="light", device="cpu", workers=0, batch_size=32)
    return TrainConfig(**{**base, **kw})


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
    ],
)
def test_bad_config_is_rejected_with_the_field_named(kw, field):
    with pytest.raises(ValidationError) as info:
        TrainConfig(**kw)
    assert field in str(info.value)


def test_hash_ignores_speed_only_fields():
    a = TrainConfig(recipe="fast", device="cpu", workers=0)
    assert a.hash() == TrainConfig(recipe="fast", device="auto", workers=8, compile=True).hash()
    assert a.hash() != TrainConfig(recipe="fast", device="cpu", seed=1).hash()


def test_warmup_then_linear_decay():
    f = WarmupLinearDecay(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5) and f(12) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(4, 12))


# --- training ---------------------------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.parametrize("recipe", ["reference", "paper", "fast"])
def test_an_interrupted_run_resumes_to_exactly_the_same_weights(recipe, tiny, tmp_path):
    config = cpu_config(recipe, epochs=3)
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
    from model.nets import build_model

    built = []
    monkeypatch.setattr(train_module, "build_model", lambda v: built.append(build_model(v))
                        or built[-1])

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
