"""One vocabulary: each training option is one field of model.config.TrainConfig, and the
Prefect form, the command line and the model config all come from it."""

from __future__ import annotations

import argparse
import dataclasses
import math

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
    given,
)
from model.config import DataConfig, TrainConfig, option

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
    form = TrainResnetsConfig(**given(args, TrainResnetsConfig))
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
