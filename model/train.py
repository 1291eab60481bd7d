"""Training: `fit()` runs one job's loop; everything it is built from lives beside it.

Recipes (DESIGN.md; the table of their defaults is model/config.py):
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

import contextlib
import dataclasses
import itertools
import logging
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import checkpoint
from model.config import TrainConfig
from model.data import Dataset
from model.loaders import make_loader
from model.nets import build_model, count_parameters
from model.optim import (
    GraphedStep,
    WeightEMA,
    compile_counts,
    compile_step,
    graph_step,
    make_optimizer,
)
from model.predict import evaluate, logits, resolve_device, synchronize, to_device_images

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0  # at most one batch-progress log line per this many seconds
# With a time budget: epochs timed before the run is sized (the first pays for warm-up).
BUDGET_PROBE_EPOCHS = 3


class NonFiniteLossError(RuntimeError):
    """The training or validation loss became NaN or infinite; the run cannot continue."""


class TrainingStopped(KeyboardInterrupt):
    """`should_stop()` asked `fit` to stop. An interrupt, not a failure: callers record the
    run as stopped (killed), and a rerun resumes from the last checkpoint."""


@dataclass
class FitResult:
    model: nn.Module  # the trained network (its weight average with `ema`), uncompiled, eval
    config: TrainConfig
    history: list[dict[str, float]]
    metrics: dict[str, float]  # final: val/loss, val/acc, val/acc_tta, test/acc, timings
    resumed_from_epoch: int | None = None  # last epoch found in the checkpoint, if resumed
    val_predicted: np.ndarray | None = None  # (V,) labels of the validation split, TTA if set


EpochHook = Callable[[dict[str, float]], None]


@dataclass
class _Step:
    """What one optimizer step needs; `model` is the compiled module when compiled."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    per_step: bool
    ema: WeightEMA | None
    bf16: bool
    compiled: bool
    should_stop: Callable[[], bool]
    update: bool = True  # False: the compile warm-up, which leaves the weights untouched
    graphed: GraphedStep | None = None  # the whole step as a CUDA graph (cuda_graph)


def fit(
    config: TrainConfig,
    data: Dataset,
    on_epoch_end: EpochHook | None = None,
    checkpoint_dir: str | Path | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Train `config.variant` with `config.recipe` on `data.train`, validating on `data.val`.

    With a `checkpoint_dir`, a checkpoint is written there atomically, on a background
    thread, at most every `config.checkpoint_seconds` and after the last epoch, then handed
    to `on_checkpoint(path)` (an upload) on that thread; a checkpoint already there is
    resumed from (it must match `config.hash()`). `on_epoch_end` gets each epoch's metrics.
    `should_stop()` is asked before every batch; once it is true, fit raises TrainingStopped.
    """
    if len(data.train) == 0:
        raise ValueError("the training split is empty")
    if len(data.val) == 0:
        raise ValueError("the validation split is empty: the learning-rate schedule and model "
                         "selection need one; set a validation size above 0")
    fit_started = time.perf_counter()
    device = resolve_device(config.device)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    _seed_everything(config.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"

    memory_format = torch.channels_last if config.channels_last else torch.preserve_format
    model = build_model(config.variant).to(device).to(memory_format=memory_format)
    loader = make_loader(config, data.train, device)
    optimizer, scheduler, per_step = make_optimizer(config, model, loader.steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    ema = WeightEMA(model, config.ema) if config.ema else None

    history: list[dict[str, float]] = []
    start_epoch, resumed_from, writer = 0, None, None
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / checkpoint.CHECKPOINT_NAME
        writer = checkpoint.CheckpointWriter(path, config.checkpoint_seconds, on_checkpoint)
        if path.exists():
            state = checkpoint.load(path, map_location=device)
            checkpoint.restore_training_state(state, config, model, optimizer, scheduler, ema,
                                              path)
            history = list(state["history"])
            resumed_from = int(state["epoch"])
            start_epoch = resumed_from + 1

    # With a time budget, the epochs are chosen once the first ones were timed, and chosen
    # again after each later one (a resumed run keeps the choice); until then, `epochs`
    # bounds the loop.
    sized, timed = bool(history) and "planned_epochs" in history[-1], len(history) + 1
    epochs = int(history[-1]["planned_epochs"]) if sized else config.epochs
    if config.time_budget_seconds and not sized:
        epochs = max(epochs, BUDGET_PROBE_EPOCHS)
    step = _Step(model, criterion, optimizer, scheduler, per_step, ema, bf16,
                 compiled=False, should_stop=should_stop or (lambda: False))
    compile_seconds, fell_back, counts = 0.0, False, (0, 0)
    if config.compiles_on(device) and start_epoch < epochs:
        counts = compile_counts()

        def warm_up(compiled: nn.Module, steps: int) -> None:  # the loop's own step
            batches = itertools.islice(_warmup_batches(loader), steps)
            warm = dataclasses.replace(step, model=compiled, compiled=True, update=False)
            _train_epoch(warm, loader, -1, config, device, batches)

        step.model, compile_seconds, fell_back = compile_step(model, warm_up, device,
                                                              config.compile_mode)
        step.compiled = step.model is not model
        counts = (compile_counts()[0], counts[1])  # frames compiled later are recompiles
    if config.cuda_graph and start_epoch < epochs:
        if device.type == "cuda":
            step.graphed, seconds = graph_step(step.model, criterion, optimizer, loader, bf16)
            compile_seconds += seconds
            fell_back = fell_back or step.graphed is None  # a compile's fallback stays
        else:
            log.warning("cuda_graph needs a CUDA device: training on %s without it", device)
    # What is validated, scored and returned: the averaged weights when there are some.
    # Evaluation runs eager: a few forward passes per epoch, not worth a second compiled
    # graph (eval-mode batch norm, other batch sizes) and its compile time.
    eval_model = ema.model if ema is not None else model
    val_images = to_device_images(data.val.images, device)  # (V, 3, 32, 32) uint8
    val_labels = torch.from_numpy(data.val.labels).to(device)
    eval_kwargs = dict(bf16=bf16, channels_last=config.channels_last)

    try:
        epoch = start_epoch - 1
        while (epoch := epoch + 1) < epochs:
            model.train()
            started = time.perf_counter()
            train_loss, train_acc, seen = _train_epoch(step, loader, epoch, config, device)
            train_seconds = time.perf_counter() - started  # _train_epoch synchronized
            lr = float(optimizer.param_groups[0]["lr"])
            val_loss, val_acc = evaluate(eval_model, val_images, val_labels, **eval_kwargs)
            val_loss, val_acc = float(val_loss), float(val_acc)
            eval_seconds = time.perf_counter() - started - train_seconds
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                raise NonFiniteLossError(f"epoch {epoch}: training loss {train_loss}, validation "
                                         f"loss {val_loss}; the run diverged "
                                         f"(learning rate {lr:g}): lower the learning rate or "
                                         "check the data; the last good checkpoint is kept")
            if not per_step:
                scheduler.step(val_loss)
            metrics = {
                "epoch": float(epoch), "train/loss": train_loss, "train/acc": train_acc,
                "val/loss": val_loss, "val/acc": val_acc, "lr": lr,
                "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                "epoch_seconds": train_seconds + eval_seconds,
                "images_per_second": seen / train_seconds,
            }
            if config.time_budget_seconds and epoch - start_epoch + 1 >= BUDGET_PROBE_EPOCHS:
                chosen = _epochs_within(config, time.perf_counter() - fit_started, epoch,
                                        [*history[timed:], metrics], data)
                if not sized or chosen != epochs:
                    log.info("time budget %.0f s: %d epochs", config.time_budget_seconds, chosen)
                    epochs, sized = chosen, True
                    if per_step:  # the decay now ends with the last epoch chosen
                        scheduler.lr_lambdas[0].resize(epochs * loader.steps_per_epoch)
            if sized:
                metrics["planned_epochs"] = float(epochs)
            history.append(metrics)
            if writer is not None and writer.due(last_epoch=epoch == epochs - 1):
                writer.submit(lambda epoch=epoch: checkpoint.training_state(
                    config, model, optimizer, scheduler, ema, epoch, history))
            if on_epoch_end is not None:
                on_epoch_end(dict(metrics))
    except BaseException:
        if writer is not None:
            # A checkpoint already handed over is finished, so a rerun resumes from it; its
            # own failure must not hide the one that stopped training.
            with contextlib.suppress(Exception):
                writer.close()
        raise
    finally:
        loader.close()
    if writer is not None:
        writer.close()  # the last epoch's checkpoint is written before fit returns

    model = eval_model.eval()
    final, val_predicted = _final_metrics(config, model, data, device, history, eval_kwargs,
                                          val_images, val_labels)
    if step.compiled:
        frames, skips = compile_counts()
        final.update(recompiles=float(frames - counts[0]),
                     cudagraph_skips=float(skips - counts[1]))
    if config.cuda_graph:
        final["cuda_graph"] = float(step.graphed is not None)
    final.update(compile_seconds=compile_seconds, compiled=float(step.compiled),
                 compile_fallback=float(fell_back),
                 checkpoint_seconds=writer.lost_seconds if writer is not None else 0.0,
                 params=float(count_parameters(model)))
    return FitResult(model, config, history, final, resumed_from, val_predicted)


def _warmup_batches(loader):
    """Batches for the compile warm-up, from epochs training never reaches (negative)."""
    for epoch in itertools.count(1):
        yield from loader.epoch(-epoch)


def _epochs_within(config: TrainConfig, spent: float, epoch: int, steady: list[dict],
                   data: Dataset) -> int:
    """The epochs that end the whole run within `config.time_budget_seconds`, `spent`
    seconds into it, at the median speed of the `steady` epochs (those after the run's
    first, which paid for warming up; one slowed by other work does not count), the final
    scoring held back (with TTA about three evaluations of the validation and test images)."""
    per_epoch, evals = (statistics.median(h[k] for h in steady)
                        for k in ("epoch_seconds", "eval_seconds"))
    final = 3 * evals * (1 + (len(data.test) if data.test is not None else 0) / len(data.val))
    more = int((config.time_budget_seconds - spent - final) // per_epoch)
    return min(epoch + 1 + max(0, more), 10_000)  # the config's bound on epochs


def _train_epoch(s: _Step, loader, epoch: int, config: TrainConfig, device: torch.device,
                 batches=None):
    """One pass over the training split (or over `batches`): (mean loss, accuracy, images
    seen). The compile warm-up runs it too, so that what it compiles is this very step."""
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, last_report = 0, time.perf_counter()
    if s.graphed is not None:
        steps = s.graphed.steps(epoch, _until_stopped(s, epoch, loader.order(epoch)[1]))
    else:
        steps = _eager_steps(s, _until_stopped(s, epoch, batches or loader.epoch(epoch)))
    for i, (loss, hits, images) in enumerate(steps):
        # Accumulated on the device: no host sync inside the step loop.
        loss_sum += loss * images
        correct += hits
        seen += images
        if time.perf_counter() - last_report > PROGRESS_SECONDS:
            # Slow epochs (a CPU, the reference pipeline) say where they are; fast ones stay
            # quiet. Reads only host-side counters: no device sync.
            last_report = time.perf_counter()
            log.info("epoch %d/%d: batch %d/%d", epoch + 1, config.epochs, i + 1,
                     loader.steps_per_epoch)
    synchronize(device)  # the epoch's training time ends when its kernels do
    return float(loss_sum) / seen, float(correct) / seen, seen


def _until_stopped(s: _Step, epoch: int, batches):
    for i, batch in enumerate(batches):
        if s.should_stop():  # host-side: costs no device sync
            raise TrainingStopped(f"stopped in epoch {epoch + 1}, before batch {i + 1}")
        yield batch


def _eager_steps(s: _Step, batches):
    """Each batch's step: (loss, correct, images) after it."""
    for x, y in batches:  # x: (B, 3, 32, 32), y: (B,)
        if s.compiled:
            # A new step for CUDA graphs (reduce-overhead): the last step's outputs,
            # already consumed by the caller, may be overwritten. Host-side only.
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(y.device.type, dtype=torch.bfloat16, enabled=s.bf16):
            out = s.model(x)
            loss = s.criterion(out, y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.update:
            s.optimizer.step()
            if s.per_step:
                s.scheduler.step()
            if s.ema is not None:
                s.ema.update()
        yield loss.detach().float(), (out.detach().argmax(1) == y).sum(), y.shape[0]


def _final_metrics(config, model, data, device, history, eval_kwargs, val_images, val_labels):
    """Final metrics, and the validation predictions (with TTA where configured)."""
    final: dict[str, float] = {
        "epochs": float(len(history)),
        "train_seconds": float(sum(h.get("train_seconds", h["epoch_seconds"])
                                   for h in history)),
        "eval_seconds": float(sum(h.get("eval_seconds", 0.0) for h in history)),
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
            final["test/acc_tta"] = float(evaluate(model, test_images, test_labels, tta=True,
                                                   **eval_kwargs)[1])
    return final, predicted.cpu().numpy().astype(np.int64)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
