"""The flows' forms and the command line's options, built from the model's config fields
(model/config.py declares each option once), so a new training option reaches the CLI,
the Prefect form, the MLflow params and the model config from one field.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from model.config import (
    DataConfig,
    TrainConfig,
    Variant,
    add_options,
    config_fields,
    is_optional,
    plain_type,
)

BOUNDS = ("ge", "gt", "le", "lt")
# A run key is a folder of checkpoints (runs/<key>/) and part of Prefect idempotency keys.
RUN_KEY = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
RUN_KEY_RULE = "1 to 64 letters, digits, '.', '_' or '-', the first a letter or digit"


def _form_type(type_: Any, meta: dict[str, Any]) -> Any:
    """The field's type with its bounds (and finiteness) on the value itself: for an
    optional number, inside the union, so that the JSON schema the Prefect UI and its
    parameter check read carries standard minimum/maximum keywords on the number."""
    bounds = {k: meta[k] for k in BOUNDS if k in meta}
    if meta.get("finite"):
        bounds["allow_inf_nan"] = False
    if not bounds:
        return type_
    value = Annotated[plain_type(type_), Field(**bounds)]
    return value | None if is_optional(type_) else value


def form_fields(cls: type, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """pydantic field definitions of a config dataclass's fields."""
    out = {}
    for f, type_ in config_fields(cls):
        if f.name not in exclude:
            default = ({"default_factory": f.default_factory}
                       if f.default_factory is not dataclasses.MISSING else {"default": f.default})
            out[f.name] = (_form_type(type_, dict(f.metadata)),
                           Field(**default, description=f.metadata.get("help")))
    return out


class _Form(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# The training options a flow run passes to every job: all of TrainConfig but what varies
# per job (variant, seed).
TrainingOptions = create_model(
    "TrainingOptions", __base__=_Form, __doc__="Options of every training job; unset "
    "numbers take the recipe's defaults (model/config.py, RECIPE_DEFAULTS).",
    **form_fields(TrainConfig, exclude=("variant", "seed")),
)
DataOptions = create_model("DataOptions", __base__=_Form,
                           __doc__="Where the training data comes from and how it is split.",
                           **form_fields(DataConfig))
TRAINING_FIELDS = tuple(TrainingOptions.model_fields)
DATA_FIELDS = tuple(DataOptions.model_fields)


def data_config(form: BaseModel) -> DataConfig:
    return DataConfig(**form.model_dump(include=set(DATA_FIELDS)))


class TrainResnetsConfig(TrainingOptions, DataOptions):
    """Parameters of the train-resnets flow; the Prefect UI renders them as its form.
    Unset numbers take the recipe's defaults (model/config.py, RECIPE_DEFAULTS)."""

    variants: list[Variant] = Field(["deep", "light"], min_length=1,
                                    description="networks to train: deep, light or both")
    seeds: list[int] = Field([0], min_length=1, description="one job per variant and seed")
    score_after: bool = Field(False, description="score the competition file after promotion")
    competition_file: str | None = Field(None, description="input of the scoring step")
    run_key: str | None = Field(
        None, pattern=f"^{RUN_KEY}$", description="runs with the same key share checkpoints "
        "and child runs: rerun with the key of an interrupted run to resume it; default: a "
        f"new key per run; {RUN_KEY_RULE}")
    dispatch: Literal["local", "pool"] = Field(
        "local", description="local: train in this process; pool: one child flow run per "
        "job on the GPU work pool (deployment train-variant)")
    child_deployment: str = Field("train-variant/train-variant",
                                  description="the deployment that pool dispatch runs")
    start_timeout_seconds: float = Field(
        900, gt=0, le=7 * 86_400, description="pool dispatch: when children wait this long "
        "with none of them running (no worker is taking the pool's work), the run fails "
        "and its children are cancelled; children queued behind running ones wait")
    timeout_seconds: float = Field(
        86_400, gt=0, le=30 * 86_400, description="pool dispatch: the longest wait for all "
        "children to end; then the run fails and cancels them")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"seeds must be distinct and non-negative, got {value}")
        return value

    def training_configs(self) -> list[TrainConfig]:
        """One model config per variant and seed, the form's training options set in each;
        validates them all before any work."""
        options = self.model_dump(include=set(TRAINING_FIELDS), exclude_none=True)
        return [TrainConfig(**options, variant=variant, seed=seed)
                for variant in self.variants for seed in self.seeds]


# --- command line ---------------------------------------------------------------------------


def add_form_arguments(parser: argparse.ArgumentParser, form: type[BaseModel],
                       aliases: dict[str, str] | None = None,
                       only: tuple[str, ...] | None = None) -> None:
    """One --option per form field (or per field in `only`), typed, with its help; the form
    checks the values."""
    add_options(parser, [(name, info.annotation, info.get_default(call_default_factory=True),
                          info.description or "") for name, info in form.model_fields.items()
                         if only is None or name in only], aliases)
