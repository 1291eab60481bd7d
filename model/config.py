"""What a training job is: its config, the recipe table, and the data it trains on.

Every option is declared once, here, as a dataclass field whose metadata carries its bounds
and help line (plain dataclasses keep `model/` free of anything but PyTorch); flows/config.py
turns the same fields into the Prefect form and the command-line options.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import operator
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from model.errors import UserError

Recipe = Literal["reference", "paper", "fast"]
Variant = Literal["deep", "light"]
Precision = Literal["auto", "fp32", "bf16"]
# torch.compile's modes: reduce-overhead replays the step as CUDA graphs (fewer launches),
# max-autotune also benchmarks kernel choices (longer compile).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

# Every recipe default, with its unit and its reason. A config field left as None takes
# the value of its recipe's column.
_REPORT = dict(
    epochs=75,  # epochs: the report's budget
    batch_size=128,  # images per step: the report's
    lr=1e-3,  # Adam step size: the report's
    weight_decay=1e-4,  # L2 coefficient inside Adam: the report's
    decay_norm_and_bias=True,  # the report decayed every parameter
    momentum=0.9,  # unused by Adam; kept so every config has one shape
    label_smoothing=0.0,  # the report used plain cross-entropy
    warmup_epochs=0.0,  # the report had no warm-up
    cutout=0,  # pixels; the report had no cutout
    tta=False,  # the report scored single views
    precision="fp32",  # the report trained in fp32
    channels_last=False,
    ema=0.0,  # weight EMA decay per step; the report had no weight averaging
)
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "reference": _REPORT,
    # The report's hyperparameters on the fast path: bf16 on CUDA for the tensor cores (fp32
    # on the CPU, where bf16 is slow) and NHWC, cuDNN's fast layout with bf16.
    "paper": {**_REPORT, "precision": "auto", "channels_last": True},
    "fast": dict(
        epochs=40,  # reaches the report's accuracy on this copy in about 40 epochs
        batch_size=512,  # fills an H100 with these small images; lr is scaled to match
        lr=0.2,  # peak SGD step size at batch 512; other batch sizes scale it linearly
        weight_decay=5e-4,  # the usual ResNet-on-CIFAR value for SGD
        # Decay shrinks a conv's weights, which batch norm undoes, so it acts as a step-size
        # schedule there; on batch-norm scales and biases it only fights the fit.
        decay_norm_and_bias=False,
        momentum=0.9,  # Nesterov momentum
        label_smoothing=0.2,  # calibrates and regularises more than it costs at 40 epochs
        # Epochs of linear warm-up: large-batch SGD diverges without it. None: 5% of the
        # budget (2 of 40 epochs, 6 of the full profile's 120), so it scales with it.
        warmup_epochs=None,
        cutout=0,  # pixels; worth it only for longer budgets (the `full` profile sets 12)
        tta=True,  # flip TTA: +0.3-0.5 points for one extra forward pass
        precision="auto",
        channels_last=True,
        ema=0.0,  # off: the decay to a zero rate already averages late weights; unmeasured
    ),
}
WARMUP_FRACTION = 0.05  # of the epochs, when a recipe leaves warmup_epochs unset
CHECKPOINT_SECONDS = 60.0  # a checkpoint at most this often (and after the last epoch)


class ConfigError(UserError, ValueError):
    """An option or setting the user gave is wrong; the message names it."""


def option(default: Any = None, help: str = "", **bounds: Any) -> Any:
    """A config field: its default, a help line for forms and the command line, and its
    bounds (ge, gt, le, lt, finite=True, choices from a Literal type)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="),
           "lt": (operator.lt, "<")}


def _check(name: str, value: Any, type_: Any, meta: dict[str, Any]) -> None:
    if value is None:
        if is_optional(type_):
            return
        raise ConfigError(f"{name}: must be set")
    kind = plain_type(type_)
    if get_origin(kind) is Literal:
        if value not in get_args(kind):
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(get_args(kind))}")
        return
    # bool is an int to Python, never to a config; an int is a fine float.
    accepted = (int, float) if kind is float else kind
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
        raise ConfigError(f"{name}: must be {kind.__name__}, got {value!r}")
    if kind in (int, float) and meta.get("finite") and not math.isfinite(value):
        raise ConfigError(f"{name}: must be a finite number, got {value}")
    for key, (ok, word) in _BOUNDS.items():
        if key in meta and not ok(value, meta[key]):
            raise ConfigError(f"{name}: must be {word} {meta[key]}, got {value}")


def validate(instance: Any) -> None:
    """Check every field of a config dataclass: its type, its choices, its bounds."""
    for f, type_ in config_fields(type(instance)):
        _check(f.name, getattr(instance, f.name), type_, dict(f.metadata))


def config_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """Each field of a config dataclass with its resolved type."""
    hints = typing.get_type_hints(cls, globalns=globals())
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def default_of(f: dataclasses.Field) -> Any:
    """The field's default; a default factory runs now."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def is_optional(type_: Any) -> bool:
    return get_origin(type_) in (Union, types.UnionType) and type(None) in get_args(type_)


def plain_type(type_: Any) -> Any:
    """int | None -> int; Annotated[int, ...] -> int."""
    if is_optional(type_):
        type_ = next(a for a in get_args(type_) if a is not type(None))
    return get_args(type_)[0] if get_origin(type_) is Annotated else type_


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from and how it is split; shared by every flow, the
    command line and the benchmark."""

    data_source: str | None = option(
        None, "path, file:// or s3:// URI of a cifar-10-python folder or .tar.gz, or a "
        "Hugging Face-style Parquet file; default $CIFAR10_SOURCE, else torchvision's download")
    val_size: int = option(5000, "images held out of training for validation", ge=1)
    train_size: int | None = option(None, "train on a stratified subset of this many images",
                                    ge=1)
    split_seed: int = option(0, "seeds the validation hold-out and the subset", ge=0)

    def __post_init__(self) -> None:
        validate(self)

    def load(self, source: str | None = None, cache_dir: str | os.PathLike | None = None,
             shared_cache: Any = None):
        """The Dataset this config names; `source` (a resolved default) when it names none.
        `shared_cache`: decoded arrays shared between machines (model.data.SharedCache)."""
        from model.data import load_dataset

        chosen = self.data_source or source
        if not chosen:
            raise ConfigError("data_source: no training data given")
        return load_dataset(chosen, val_size=self.val_size, seed=self.split_seed,
                            train_size=self.train_size, cache_dir=cache_dir,
                            shared_cache=shared_cache)


@dataclass(frozen=True)
class TrainConfig:
    """One training job. Fields left unset take their recipe's default (RECIPE_DEFAULTS)."""

    recipe: Recipe = option("fast", "reference: the report's pipeline; paper: its "
                            "hyperparameters, fast; fast: the project's recipe")
    variant: Variant = option("light", "network: deep [4,4,3] or light [2,2,2] blocks")
    epochs: int | None = option(None, "training epochs", ge=1, le=10_000)
    batch_size: int | None = option(None, "images per optimizer step", ge=1, le=65_536)
    lr: float | None = option(None, "peak learning rate (fast: at batch 512, scaled linearly)",
                              gt=0, le=10, finite=True)
    weight_decay: float | None = option(None, "L2 weight decay", ge=0, le=1, finite=True)
    decay_norm_and_bias: bool | None = option(
        None, "apply weight decay to batch-norm and bias parameters too")
    momentum: float | None = option(None, "SGD momentum (fast)", ge=0, lt=1, finite=True)
    label_smoothing: float | None = option(None, "cross-entropy label smoothing", ge=0, lt=1,
                                           finite=True)
    warmup_epochs: float | None = option(None, "epochs of linear learning-rate warm-up (fast)",
                                         ge=0, le=10_000, finite=True)
    cutout: int | None = option(None, "cutout square side in pixels; 0 = off", ge=0, le=32)
    tta: bool | None = option(None, "also score validation with flip test-time augmentation")
    seed: int = option(0, "seeds init, data order and augmentation", ge=0)
    device: str = option("auto", "auto = cuda if present, else cpu; or cpu, cuda, cuda:N")
    precision: Precision | None = option(None, "auto = bf16 autocast on CUDA, fp32 elsewhere")
    channels_last: bool | None = option(None, "NHWC memory format for the convolutions")
    ema: float | None = option(
        None, "weight EMA decay per optimizer step (e.g. 0.999); 0 = off. The averaged "
        "weights are validated, scored and returned", ge=0, lt=1, finite=True)
    compile: bool | None = option(
        None, "torch.compile the training step (timed apart); default: on for paper and fast "
        "on CUDA. A failing compile falls back to eager")
    compile_mode: CompileMode = option("default", "torch.compile mode; reduce-overhead adds "
                                       "CUDA graphs")
    cuda_graph: bool = option(
        False, "paper on CUDA: replay the whole step (batch gather, augmentation, forward, "
        "backward, Adam) as one CUDA graph; a failed capture falls back to the plain step")
    workers: int = option(lambda: min(16, os.cpu_count() or 1),
                          "DataLoader worker processes (reference recipe)", ge=0, le=256)
    checkpoint_seconds: float = option(
        CHECKPOINT_SECONDS, "write a checkpoint at most this often (and after the last "
        "epoch); 0 = after every epoch", ge=0, finite=True)
    time_budget_seconds: float | None = option(
        None, "train for as many epochs as end the whole run (compile and evaluation "
        "included) within this many seconds, sized on the first epochs' speed; epochs then "
        "sets only the warm-up", gt=0, le=30 * 86_400, finite=True)

    def __post_init__(self) -> None:
        validate(self)
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ConfigError(f"device: not a device: {self.device!r} (use auto, cpu, "
                                  "cuda or cuda:N)") from exc
        for name, value in RECIPE_DEFAULTS[self.recipe].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.warmup_epochs is None:
            object.__setattr__(self, "warmup_epochs", round(WARMUP_FRACTION * self.epochs, 3))
        if self.cuda_graph and (self.recipe != "paper"
                                or self.compile_mode in ("reduce-overhead", "max-autotune")):
            raise ConfigError("cuda_graph: only for the paper recipe, with compile_mode "
                              "default or max-autotune-no-cudagraphs (the step is one graph)")

    # Fields that change speed, not the meaning of a checkpoint.
    SPEED_ONLY = ("device", "workers", "compile", "compile_mode", "checkpoint_seconds")
    # The fields the first checkpoints were hashed with: always in the hash, so that those
    # checkpoints still resume. A field added since enters it only when set away from its
    # default, so adding an option does not orphan the checkpoints written before it.
    HASHED_ALWAYS = ("recipe", "variant", "epochs", "batch_size", "lr", "weight_decay",
                     "decay_norm_and_bias", "momentum", "label_smoothing", "warmup_epochs",
                     "cutout", "tta", "seed", "precision", "channels_last")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def hash(self) -> str:
        """Identifies the training trajectory: what a checkpoint must match to be resumed."""
        payload = {f.name: getattr(self, f.name) for f, _ in config_fields(type(self))
                   if f.name not in self.SPEED_ONLY and (f.name in self.HASHED_ALWAYS
                                                         or not self._at_default(f))}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _at_default(self, f: dataclasses.Field) -> bool:
        """Whether the field holds what it would unset: its default, or its recipe's."""
        default = default_of(f)
        if default is None:
            default = RECIPE_DEFAULTS[self.recipe].get(f.name)
        return getattr(self, f.name) == default

    def compiles_on(self, device: Any) -> bool:
        """Whether training on `device` compiles its step: as set, else on CUDA for `paper`
        and `fast`, whose many small kernels compilation fuses (not `reference`, the report's
        pipeline as it was; not on a CPU, where the C++ build costs more than it saves)."""
        if self.compile is not None:
            return self.compile
        return self.recipe in ("paper", "fast") and device.type == "cuda"


# --- command-line options, one per field ------------------------------------------------


def option_specs(*classes: type, skip: tuple[str, ...] = ()) -> list[tuple[str, Any, Any, str]]:
    """(name, type, default, help) of each field of config dataclasses, for `add_options`."""
    return [(f.name, type_, default_of(f), f.metadata.get("help", ""))
            for cls in classes for f, type_ in config_fields(cls) if f.name not in skip]


def add_options(parser: argparse.ArgumentParser, specs: list[tuple[str, Any, Any, str]],
                aliases: dict[str, str] | None = None) -> None:
    """One --option per (name, type, default, help): typed, a Literal's choices, --x/--no-x
    for a bool, comma-separated for a list. Each parses to None when not given (the help
    line shows the real default), so that `given` leaves the rest to the config."""
    aliases = aliases or {}
    for name, type_, default, help_ in specs:
        kind = plain_type(type_)
        if default is not None and kind is not bool:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_ = f"{help_} (default {shown})"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            kwargs["choices"] = get_args(kind)
        elif get_origin(kind) is list:
            kwargs.update(type=_comma_list(plain_type(get_args(kind)[0])), metavar="A,B")
        elif kind in (int, float, str):
            kwargs["type"] = kind
        else:
            continue  # nothing the command line can express
        flags = [f"--{name.replace('_', '-')}", *([aliases[name]] if name in aliases else [])]
        parser.add_argument(*flags, **kwargs)


def _comma_list(item: Any):
    choices = get_args(item) if get_origin(item) is Literal else None

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if choices:
            if bad := [part for part in parts if part not in choices]:
                raise argparse.ArgumentTypeError(
                    f"{', '.join(bad)}: not one of {', '.join(choices)}")
            return parts
        try:
            return [item(part) for part in parts]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from exc

    return parse


def given(args: argparse.Namespace, names: Any) -> dict[str, Any]:
    """The options among `names` set on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
