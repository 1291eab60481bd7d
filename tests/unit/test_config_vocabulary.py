"""One vocabulary: each training option is one field of model.config.TrainConfig, and the
Prefect form, the command line and the model config all come from it."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
from typing import Literal, get_args, get_origin

import pytest
from pydantic import ValidationError, create_model

from flows.cli import _parser
from flows.config import (
    DATA_FIELDS,
    TRAINING_FIELDS,
    TrainResnetsConfig,
    _Form,
    add_form_arguments,
    data_config,
    form_fields,
)
from model.config import (
    ConfigError,
    DataConfig,
    Recipe,
    TrainConfig,
    config_fields,
    given,
    is_optional,
    option,
    plain_type,
)

PER_JOB = {"variant", "seed"}  # the form takes lists of these instead


def _train_subparser() -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_model_option_is_in_the_form_with_its_help_and_bounds():
    names = {f.name for f in dataclasses.fields(TrainConfig)} - PER_JOB
    assert names == set(TRAINING_FIELDS)
    assert {f.name for f in dataclasses.fields(DataConfig)} == set(DATA_FIELDS)
    for name in (*TRAINING_FIELDS, *DATA_FIELDS):
        assert TrainResnetsConfig.model_fields[name].description, name
    # The bounds came along: the form refuses what the model config would.
    for bad in ({"epochs": 0}, {"lr": math.nan}, {"ema": 1.0}, {"val_size": 0},
                {"compile_mode": "turbo"}, {"checkpoint_seconds": -1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            TrainResnetsConfig(**bad)


def test_every_command_line_option_of_train_has_a_help_line():
    actions = [a for a in _train_subparser()._actions if a.option_strings != ["-h", "--help"]]
    # The form's fields, plus the options every command takes (--state-dir).
    assert set(TrainResnetsConfig.model_fields) <= {a.dest for a in actions}
    assert all(a.help and a.help.strip() for a in actions), [a.dest for a in actions
                                                             if not a.help]


def test_the_command_line_reaches_every_job_through_the_form():
    args = _parser().parse_args([
        "train", "--variants", "light", "--seeds", "0,3", "--epochs", "3", "--no-tta",
        "--data", "/data/train.parquet", "--val-size", "64", "--compile-mode",
        "reduce-overhead", "--checkpoint-seconds", "0", "--lr", "0.1"])
    form = TrainResnetsConfig(**given(args, TrainResnetsConfig.model_fields))
    jobs = form.training_configs()
    assert [(j.variant, j.seed) for j in jobs] == [("light", 0), ("light", 3)]
    assert {(j.epochs, j.tta, j.compile_mode, j.checkpoint_seconds, j.lr) for j in jobs} == {
        (3, False, "reduce-overhead", 0.0, 0.1)}
    # Unset options keep the recipe's defaults, not the form's None.
    assert jobs[0].batch_size == TrainConfig(recipe="fast").batch_size
    assert data_config(form) == DataConfig(data_source="/data/train.parquet", val_size=64)


def test_a_new_option_is_one_field():
    """What adding an option takes: a field with its help and bounds. The form and the
    command line pick it up without another line of code."""

    @dataclasses.dataclass(frozen=True)
    class Extended(TrainConfig):
        dropout: float = option(0.0, "dropout before the classifier", ge=0, lt=1,
                                finite=True)

    form = create_model("ExtendedForm", __base__=_Form, **form_fields(Extended))
    with pytest.raises(ValidationError, match="dropout"):
        form(dropout=1.5)
    parser = argparse.ArgumentParser()
    add_form_arguments(parser, form)
    (action,) = [a for a in parser._actions if a.dest == "dropout"]
    assert action.option_strings == ["--dropout"] and "dropout before" in action.help
    assert parser.parse_args(["--dropout", "0.25"]).dropout == 0.25
    assert Extended(dropout=0.25).to_dict()["dropout"] == 0.25  # and so the MLflow params


def _wrong_values(type_) -> list:
    """Values of the wrong type or outside the choices, for a field of type `type_`."""
    kind = plain_type(type_)
    wrong = {bool: [1, "yes"], int: ["3", 2.5, True], float: ["0.1", False], str: [3, b"x"]}
    if get_origin(kind) is Literal:
        return ["nonsense", 1]
    return wrong[kind] + ([] if is_optional(type_) else [None])


@pytest.mark.parametrize("cls", [TrainConfig, DataConfig])
def test_every_field_refuses_a_wrong_type_or_choice(cls):
    fields = config_fields(cls)
    assert fields
    for f, type_ in fields:
        for bad in _wrong_values(type_):
            with pytest.raises(ConfigError, match=f"^{f.name}: "):
                cls(**{f.name: bad})
    with pytest.raises(ConfigError, match="precision: 'fp16' is not one of"):
        TrainConfig(precision="fp16")  # optional choices are checked too


def test_a_default_factory_runs_when_a_config_is_made(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert TrainConfig().workers == 3
    assert TrainResnetsConfig().workers == 3  # the form's default, too: not fixed at import
    monkeypatch.setattr("os.cpu_count", lambda: 5)
    assert TrainConfig().workers == TrainResnetsConfig().workers == 5


# Hashes of configs as checkpoints recorded them before fields at their defaults were left
# out of the hash: they must never change, or those checkpoints stop resuming.
RECORDED_HASHES = [
    ({}, "0820a851436b230a"),
    ({"recipe": "reference", "variant": "deep"}, "dcce5b6b8edac9df"),
    ({"recipe": "paper", "seed": 3}, "6ed8eeb9d73b01f2"),
    ({"epochs": 2, "batch_size": 64, "lr": 0.05}, "3c879c340b0b3901"),
    ({"ema": 0.999}, "084feb56302512ef"),
    ({"cutout": 12, "tta": False, "precision": "bf16", "warmup_epochs": 1.5},
     "b4716d6d9231b244"),
    ({"device": "cpu", "workers": 0, "compile": False, "checkpoint_seconds": 0},
     "0820a851436b230a"),
]


@pytest.mark.parametrize(("fields", "recorded"), RECORDED_HASHES)
def test_the_hash_of_an_existing_config_is_unchanged(fields, recorded):
    assert TrainConfig(**fields).hash() == recorded


def test_a_new_field_at_its_default_leaves_the_hash_alone():
    @dataclasses.dataclass(frozen=True)
    class Extended(TrainConfig):
        dropout: float = option(0.0, "dropout before the classifier", ge=0, lt=1)
        mixup: float | None = option(None, "mixup alpha; None: the recipe's (none)", ge=0)

    base = TrainConfig(recipe="paper", epochs=3).hash()
    assert Extended(recipe="paper", epochs=3).hash() == base
    changed = {Extended(recipe="paper", epochs=3, dropout=0.1).hash(),
               Extended(recipe="paper", epochs=3, mixup=0.2).hash()}
    assert base not in changed and len(changed) == 2
    assert TrainConfig(epochs=3).hash() != TrainConfig(epochs=4).hash()


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_run_takes_its_options_from_the_form():
    actions = {a.dest: a for a in _subparser("run")._actions}
    assert actions["recipe"].choices == get_args(Recipe)
    args = _parser().parse_args(["run", "--variants", "light", "--seed", "2,5", "--data", "d",
                                 "--recipe", "paper", "--run-key", "k"])
    assert given(args, TrainResnetsConfig.model_fields) == {
        "variants": ["light"], "seeds": [2, 5], "data_source": "d", "recipe": "paper",
        "run_key": "k"}
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--variants", "deep,huge"])


def test_python_m_model_takes_every_option_over_its_profile(monkeypatch, capsys):
    from model import __main__ as entry

    loaded, trained = [], []

    def load(self, source=None, **kw):
        loaded.append((self, source))
        return types.SimpleNamespace(digest="d" * 16, train=[1], val=[1])

    def fit(config, data, **kw):
        trained.append(config)
        return types.SimpleNamespace(metrics={"epochs": config.epochs, "train_seconds": 1.0,
                                              "val/acc": 0.5})

    monkeypatch.setattr(DataConfig, "load", load)
    monkeypatch.setattr(entry, "fit", fit)
    assert entry.main(["--profile", "quick", "--variants", "light", "--epochs", "3",
                       "--precision", "bf16", "--val-size", "7", "--data", "/d"]) == 0
    ((data, _),) = loaded
    assert (data.data_source, data.val_size, data.train_size) == ("/d", 7, 1000)
    ((config,),) = [trained]
    assert (config.variant, config.epochs, config.batch_size, config.precision) == (
        "light", 3, 64, "bf16")  # given, the quick profile's, given
    with pytest.raises(SystemExit):
        entry.main(["--precision", "fp16"])
