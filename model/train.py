"""Training: one config, three recipes, a checkpoint every epoch.

Recipes (DESIGN.md):
- `reference`: the report's pipeline exactly: PIL transforms in DataLoader workers, fp32,
  Adam, ReduceLROnPlateau, but stepped on the validation loss instead of the test loss.
- `paper`: the report's hyperparameters and augmentations, with the whole dataset resident
  on the device as uint8, augmented there in batches, bf16 autocast and channels_last.
- `fast`: the project's recipe for accuracy per second: Nesterov SGD at batch 512, linear
  warm-up then linear decay, label smoothing, crop + flip (+ cutout), flip TTA.

Any recipe may keep an exponential moving average of the weights (`ema`); it is then the
model that is validated, scored and returned.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from model import augment, checkpoint
from model.data import Dataset, Split
from model.nets import build_model, count_parameters
from model.predict import evaluate, logits, resolve_device, synchronize, to_device_images

log = logging.getLogger(__name__)

Recipe = Literal["reference", "paper", "fast"]
# torch.compile's modes: reduce-overhead replays the step as CUDA graphs (fewer launches),
# max-autotune also benchmarks kernel choices (longer compile).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_BACKEND = "inductor"  # torch.compile's backend; `mode` applies to inductor only

# Every recipe default, with its unit and its reason. A config field left as None takes
# the value of its recipe's column.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "reference": dict(
        epochs=75,  # epochs: the report's budget
        batch_size=128,  # images per step: the report's
        lr=1e-3,  # Adam step size: the report's
        weight_decay=1e-4,  # L2 coefficient inside Adam: the report's
        momentum=0.9,  # unused by Adam; kept so every config has one shape
        label_smoothing=0.0,  # the report used plain cross-entropy
        warmup_epochs=0.0,  # the report had no warm-up
        cutout=0,  # pixels; the report had no cutout
        tta=False,  # the report scored single views
        precision="fp32",  # the report trained in fp32
        channels_last=False,
        ema=0.0,  # weight EMA decay per step; the report had no weight averaging
    ),
    "paper": dict(
        epochs=75,
        batch_size=128,
        lr=1e-3,
        weight_decay=1e-4,
        momentum=0.9,
        label_smoothing=0.0,
        warmup_epochs=0.0,
        cutout=0,
        tta=False,
        precision="auto",  # bf16 on CUDA: tensor cores; fp32 on the CPU, where bf16 is slow
        channels_last=True,  # NHWC convolutions are the fast path for cuDNN with bf16
        ema=0.0,  # the report's hyperparameters: no weight averaging
    ),
    "fast": dict(
        epochs=40,  # reaches the report's accuracy on this copy in about 40 epochs
        batch_size=512,  # fills an H100 with these small images; lr is scaled to match
        lr=0.2,  # peak SGD step size at batch 512; other batch sizes scale it linearly
        weight_decay=5e-4,  # the usual ResNet-on-CIFAR value for SGD
        momentum=0.9,  # Nesterov momentum
        label_smoothing=0.2,  # calibrates and regularises more than it costs at 40 epochs
        warmup_epochs=2.0,  # epochs of linear warm-up: large-batch SGD diverges without it
        cutout=0,  # pixels; worth it only for longer budgets (the `full` profile sets 12)
        tta=True,  # flip TTA: +0.3-0.5 points for one extra forward pass
        precision="auto",
        channels_last=True,
        ema=0.0,  # off: the decay to a zero rate already averages late weights; unmeasured
    ),
}
EMA_WARMUP = 10  # updates: the decay ramps as (1 + n) / (EMA_WARMUP + n) up to `ema`
FAST_REFERENCE_BATCH = 512  # images: the batch size at which `fast`'s lr applies as given
PROGRESS_SECONDS = 10.0  # at most one batch-progress log line per this many seconds
PLATEAU_FACTOR = 0.1  # the report's ReduceLROnPlateau settings
PLATEAU_PATIENCE = 5  # epochs


class TrainConfig(BaseModel):
    """One training job. Fields left unset take their recipe's default (RECIPE_DEFAULTS)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    recipe: Recipe = "fast"
    variant: Literal["deep", "light"] = "light"
    epochs: int | None = Field(None, ge=1, le=10_000, description="training epochs")
    batch_size: int | None = Field(None, ge=1, le=65_536, description="images per step")
    lr: float | None = Field(None, gt=0, le=10, description="peak learning rate")
    weight_decay: float | None = Field(None, ge=0, le=1)
    momentum: float | None = Field(None, ge=0, lt=1)
    label_smoothing: float | None = Field(None, ge=0, lt=1)
    warmup_epochs: float | None = Field(None, ge=0)
    cutout: int | None = Field(None, ge=0, le=32, description="cutout square side, pixels")
    tta: bool | None = Field(None, description="score validation with flip TTA as well")
    seed: int = Field(0, ge=0, description="seeds init, data order and augmentation")
    device: str = Field("auto", description="auto = cuda if present, else cpu; or cuda:N")
    precision: Literal["auto", "fp32", "bf16"] | None = None
    channels_last: bool | None = None
    ema: float | None = Field(
        None, ge=0, lt=1,
        description="weight EMA decay per optimizer step (e.g. 0.999); 0 = off. "
        "The averaged weights are validated, scored and returned; buffers are copied",
    )
    compile: bool | None = Field(
        None, description="torch.compile the training step (compile time is timed apart); "
        "default: on for `paper` and `fast` on CUDA. A failing compile falls back to eager",
    )
    compile_mode: CompileMode = Field("default", description="torch.compile mode")
    workers: int = Field(
        default_factory=lambda: min(16, os.cpu_count() or 1),
        ge=0,
        le=256,
        description="DataLoader worker processes (reference recipe)",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_recipe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            recipe = data.get("recipe", "fast")
            defaults = RECIPE_DEFAULTS.get(recipe)
            if defaults is not None:  # an unknown recipe is reported by the Literal check
                data = {**defaults, **{k: v for k, v in data.items() if v is not None}}
        return data

    @field_validator("lr", "weight_decay", "momentum", "label_smoothing", "warmup_epochs",
                     "ema")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError as exc:
                raise ValueError(
                    f"not a device: {value!r} (use auto, cpu, cuda or cuda:N)"
                ) from exc
        return value

    def hash(self) -> str:
        """Identifies the training trajectory: what a checkpoint must match to be resumed.

        Device, workers and compilation change speed, not the meaning of a checkpoint.
        """
        payload = self.model_dump(exclude={"device", "workers", "compile", "compile_mode"})
        if not payload["ema"]:
            del payload["ema"]  # off: the same hash as before the field existed
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def compiles_on(self, device: torch.device) -> bool:
        """Whether training on `device` compiles its step: as set, else on CUDA for the
        device-resident recipes (`paper`, `fast`), whose many small kernels per step are
        what compilation fuses. Not `reference`, which is the report's pipeline as it was,
        and not on a CPU, where the inductor's C++ build costs more than it saves."""
        if self.compile is not None:
            return self.compile
        return self.recipe in ("paper", "fast") and device.type == "cuda"


class NonFiniteLossError(RuntimeError):
    """The training or validation loss became NaN or infinite; the run cannot continue."""


@dataclass
class FitResult:
    model: nn.Module  # the trained network (its weight average with `ema`), uncompiled, eval
    config: TrainConfig
    history: list[dict[str, float]]
    metrics: dict[str, float]  # final: val/loss, val/acc, val/acc_tta, test/acc, timings
    resumed_from_epoch: int | None = None  # last epoch found in the checkpoint, if resumed
    val_predicted: np.ndarray | None = None  # (V,) labels of the validation split, TTA if set


EpochHook = Callable[[dict[str, float]], None]


def fit(
    config: TrainConfig,
    data: Dataset,
    on_epoch_end: EpochHook | None = None,
    checkpoint_dir: str | Path | None = None,
) -> FitResult:
    """Train `config.variant` with `config.recipe` on `data.train`, validating on `data.val`.

    With a `checkpoint_dir`, a checkpoint is written there atomically after every epoch,
    and a checkpoint already there is resumed from (it must match `config.hash()`).
    `on_epoch_end` gets the metrics named in DESIGN.md after each epoch's checkpoint.
    """
    if len(data.train) == 0:
        raise ValueError("the training split is empty")
    if len(data.val) == 0:
        raise ValueError(
            "the validation split is empty: the learning-rate schedule and model selection "
            "need one; set a validation size above 0"
        )
    device = resolve_device(config.device)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    _seed_everything(config.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"

    model = build_model(config.variant).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    model = model.to(memory_format=memory_format)
    loader = _make_loader(config, data.train, device)
    optimizer, scheduler, per_step = _make_optimizer(config, model, loader.steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    ema = WeightEMA(model, config.ema) if config.ema else None

    history: list[dict[str, float]] = []
    start_epoch, resumed_from = 0, None
    ckpt_path = Path(checkpoint_dir) / checkpoint.CHECKPOINT_NAME if checkpoint_dir else None
    if ckpt_path is not None and ckpt_path.exists():
        state = checkpoint.load(ckpt_path, map_location=device)
        _restore(state, config, model, optimizer, scheduler, ema, ckpt_path)
        history = list(state["history"])
        resumed_from = int(state["epoch"])
        start_epoch = resumed_from + 1

    step_model, compile_seconds = model, 0.0
    if config.compiles_on(device):
        step_model, compile_seconds = _compile(model, criterion, loader, device, bf16,
                                               config.compile_mode)
    compiled = step_model is not model
    # What is validated, scored and returned: the averaged weights when there are some.
    # Evaluation runs eager: a few forward passes per epoch, not worth a second compiled
    # graph (eval-mode batch norm, other batch sizes) and its compile time.
    eval_model = ema.model if ema is not None else model

    val_images = to_device_images(data.val.images, device)  # (V, 3, 32, 32) uint8
    val_labels = torch.from_numpy(data.val.labels).to(device)
    eval_kwargs = dict(bf16=bf16, channels_last=config.channels_last)

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen, last_report = 0, started
        for step, (x, y) in enumerate(loader.epoch(epoch)):  # x: (B, 3, 32, 32), y: (B,)
            if compiled:
                # A new step for CUDA graphs (reduce-overhead): the last step's outputs,
                # already consumed below, may be overwritten. Host-side only.
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = step_model(x)
                loss = criterion(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if per_step:
                scheduler.step()
            if ema is not None:
                ema.update()
            # Accumulated on the device: no host sync inside the step loop.
            loss_sum += loss.detach().float() * y.shape[0]
            correct += (out.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if time.perf_counter() - last_report > PROGRESS_SECONDS:
                # Slow epochs (a CPU, the reference pipeline) say where they are; fast ones
                # stay quiet. Reads only host-side counters: no device sync.
                last_report = time.perf_counter()
                log.info("epoch %d/%d: batch %d/%d", epoch + 1, config.epochs, step + 1,
                         loader.steps_per_epoch)
        lr = optimizer.param_groups[0]["lr"]
        val_loss, val_acc = evaluate(eval_model, val_images, val_labels, **eval_kwargs)
        synchronize(device)
        seconds = time.perf_counter() - started
        train_loss = float(loss_sum) / seen
        if not (math.isfinite(train_loss) and math.isfinite(float(val_loss))):
            raise NonFiniteLossError(
                f"epoch {epoch}: training loss {train_loss}, validation loss {float(val_loss)}; "
                f"the run diverged (learning rate {lr:g}): lower the learning rate or check "
                "the data; the last good checkpoint is kept"
            )
        if not per_step:
            scheduler.step(float(val_loss))
        metrics = {
            "epoch": float(epoch),
            "train/loss": train_loss,
            "train/acc": float(correct) / seen,
            "val/loss": float(val_loss),
            "val/acc": float(val_acc),
            "lr": lr,
            "epoch_seconds": seconds,
            "images_per_second": seen / seconds,
        }
        history.append(metrics)
        if ckpt_path is not None:
            _save(ckpt_path, config, model, optimizer, scheduler, ema, epoch, history)
        if on_epoch_end is not None:
            on_epoch_end(dict(metrics))

    model = ema.model if ema is not None else model
    model.eval()
    final, val_predicted = _final_metrics(config, model, data, device, history, eval_kwargs,
                                          val_images, val_labels)
    final["compile_seconds"] = compile_seconds
    final["compiled"] = float(compiled)
    final["params"] = float(count_parameters(model))
    return FitResult(model, config, history, final, resumed_from, val_predicted)


def _final_metrics(config, model, data, device, history, eval_kwargs, val_images, val_labels):
    """Final metrics, and the validation predictions (with TTA where configured)."""
    final: dict[str, float] = {
        "epochs": float(len(history)),
        "train_seconds": float(sum(h["epoch_seconds"] for h in history)),
    }
    val_logits = logits(model, val_images, tta=bool(config.tta), **eval_kwargs)
    predicted = val_logits.argmax(1)
    if history:
        # The last epoch already scored this very model on the validation split.
        final["val/loss"], final["val/acc"] = history[-1]["val/loss"], history[-1]["val/acc"]
    else:
        loss, acc = evaluate(model, val_images, val_labels, **eval_kwargs)
        final["val/loss"], final["val/acc"] = float(loss), float(acc)
    if config.tta:
        final["val/acc_tta"] = float((predicted == val_labels).float().mean())
    if data.test is not None and len(data.test):
        test_images = to_device_images(data.test.images, device)
        test_labels = torch.from_numpy(data.test.labels).to(device)
        final["test/acc"] = float(evaluate(model, test_images, test_labels, **eval_kwargs)[1])
        if config.tta:
            final["test/acc_tta"] = float(
                evaluate(model, test_images, test_labels, tta=True, **eval_kwargs)[1]
            )
    return final, predicted.cpu().numpy().astype(np.int64)


# --- data pipelines -------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's data order and augmentation come from (seed, epoch) alone, so a resumed
    run sees exactly the batches an uninterrupted one would have."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % 2**63


class DeviceLoader:
    """The whole split resident on the device as uint8; batches augmented there."""

    def __init__(self, split: Split, device: torch.device, batch_size: int, seed: int,
                 augmenter: Callable[..., torch.Tensor], channels_last: bool):
        self.images = to_device_images(split.images, device)  # (N, 3, 32, 32) uint8
        self.labels = torch.from_numpy(split.labels).to(device)
        self.device, self.batch_size, self.seed = device, batch_size, seed
        self.augmenter, self.channels_last = augmenter, channels_last
        n = len(split)
        # Dropping the ragged last batch keeps shapes static (compile, CUDA graphs) once
        # there is at least one full batch.
        self.drop_last = n >= batch_size
        self.steps_per_epoch = n // batch_size if self.drop_last else 1

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator(device=self.device).manual_seed(epoch_seed(self.seed, epoch))
        n = self.images.shape[0]
        order = torch.randperm(n, device=self.device, generator=gen)
        stop = self.steps_per_epoch * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.augmenter(self.images[idx], generator=gen)  # (B, 3, 32, 32) uint8
            x = augment.normalize(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


class ReferenceLoader:
    """The report's pipeline: PIL transforms per image in DataLoader worker processes."""

    def __init__(self, split: Split, device: torch.device, batch_size: int, seed: int,
                 workers: int):
        self.dataset = augment.PILDataset(split.images, split.labels,
                                          augment.reference_transform(train=True))
        self.device, self.batch_size, self.seed, self.workers = device, batch_size, seed, workers
        self.steps_per_epoch = math.ceil(len(split) / batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = epoch_seed(self.seed, epoch)
        # Workers derive their seeds from the loader's generator; without workers the
        # transforms draw from the global generator, so seed that too.
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.workers,
            generator=torch.Generator().manual_seed(seed),
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )
        for x, y in loader:
            yield (x.to(self.device, non_blocking=True),
                   y.to(self.device, non_blocking=True))


def _make_loader(config: TrainConfig, split: Split, device: torch.device):
    if config.recipe == "reference":
        return ReferenceLoader(split, device, config.batch_size, config.seed, config.workers)
    if config.recipe == "paper":
        augmenter = augment.report_augment
    elif config.cutout:
        cutout = config.cutout

        def augmenter(x, generator=None):
            return augment.crop_flip(x, cutout_size=cutout, generator=generator)
    else:
        augmenter = augment.crop_flip
    return DeviceLoader(split, device, config.batch_size, config.seed, augmenter,
                        config.channels_last)


# --- optimisation ---------------------------------------------------------------------------


def _make_optimizer(config: TrainConfig, model: nn.Module, steps_per_epoch: int):
    """(optimizer, scheduler, whether the scheduler steps per batch)."""
    on_cuda = next(model.parameters()).is_cuda
    if config.recipe in ("reference", "paper"):
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                     weight_decay=config.weight_decay,
                                     fused=on_cuda and config.recipe == "paper")
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE
        )
        return optimizer, scheduler, False
    # Linear scaling keeps one `lr` right for the smoke profile's batch 64 and the full
    # profile's 512 alike: SGD with momentum diverges at batch 64 with batch 512's rate.
    lr = config.lr * config.batch_size / FAST_REFERENCE_BATCH
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum,
                                nesterov=True, weight_decay=config.weight_decay,
                                fused=on_cuda or None)
    total = max(1, config.epochs * steps_per_epoch)
    # Short runs (the smoke and quick profiles) would otherwise end inside the warm-up.
    warmup = min(total // 4, round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(warmup, total))
    return optimizer, scheduler, True


class WarmupLinearDecay:
    """Learning-rate factor: linear from 1/warmup up to 1, then linear down to 0 at `total`."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def _compile(model, criterion, loader, device, bf16, mode) -> tuple[nn.Module, float]:
    """(step model, seconds): `model` compiled, and compilation triggered on one real batch
    so that its cost is timed apart from training. The warm-up touches no weights: its
    gradients are dropped and the batch-norm statistics it moved are put back.

    Compilation fails in ways that depend on the machine (no C++ compiler, no Triton for
    this GPU, an unsupported operator). Training does not need it, so a failure is logged
    and the step runs eager: (model, seconds spent trying).
    """
    started = time.perf_counter()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"mode": mode} if COMPILE_BACKEND == "inductor" else {}
    try:
        compiled = torch.compile(model, backend=COMPILE_BACKEND, **options)
        x, y = next(iter(loader.epoch(-1)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            criterion(compiled(x), y).backward()
        synchronize(device)
    except Exception as exc:  # any failure leaves eager training intact
        log.warning("torch.compile(mode=%s) failed, training eager instead: %s: %s",
                    mode, type(exc).__name__, exc)
        compiled = model
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    return compiled, time.perf_counter() - started


class WeightEMA:
    """An exponential moving average of a model's parameters, kept in a copy of the model.

    After each optimizer step, average <- average + (1 - d) * (weights - average), with
    d = min(decay, (1 + n) / (EMA_WARMUP + n)) at the n-th update, so that the random
    initial weights wash out of short runs. Buffers (the batch-norm statistics) are copied,
    not averaged. One foreach kernel per tensor list and a host-side counter: no device
    sync.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        self._params = list(model.parameters())
        self._avg_params = list(self.model.parameters())
        self._buffers = list(model.buffers())
        self._avg_buffers = list(self.model.buffers())

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (EMA_WARMUP + self.updates))
        torch._foreach_lerp_(self._avg_params, self._params, 1.0 - d)
        if self._buffers:
            torch._foreach_copy_(self._avg_buffers, self._buffers)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


# --- checkpoints ----------------------------------------------------------------------------


def _save(path, config, model, optimizer, scheduler, ema, epoch, history) -> None:
    state = {
        "format": 1,
        "config": config.model_dump(),
        "config_hash": config.hash(),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "history": history,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": _numpy_rng_state(),
        },
    }
    checkpoint.save_atomic(state, path)


def _restore(state, config, model, optimizer, scheduler, ema, path) -> None:
    if state.get("config_hash") != config.hash():
        raise checkpoint.CheckpointError(
            f"{path} was written by another configuration (hash {state.get('config_hash')}, "
            f"this one is {config.hash()}): use a fresh checkpoint directory or the same config"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        if state.get("ema") is None:
            raise checkpoint.CheckpointError(
                f"{path} has no weight average although its configuration asks for one: "
                "the checkpoint is incomplete; use a fresh checkpoint directory"
            )
        ema.load_state_dict(state["ema"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    random.setstate(_as_python_state(rng["python"]))
    np.random.set_state(("MT19937", rng["numpy"]["key"].numpy().astype(np.uint32),
                         rng["numpy"]["pos"], 0, 0.0))


def _numpy_rng_state() -> dict[str, Any]:
    # Stored as a tensor so that the checkpoint stays loadable with weights_only=True.
    _, key, pos, _, _ = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos)}


def _as_python_state(state):
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
