"""The optimizer, learning-rate schedule, weight average and compiled step of a recipe."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from model.config import TrainConfig
from model.loaders import epoch_seed
from model.predict import synchronize

log = logging.getLogger("model.train")

EMA_WARMUP = 10  # updates: the decay ramps as (1 + n) / (EMA_WARMUP + n) up to `ema`
FAST_REFERENCE_BATCH = 512  # images: the batch size at which `fast`'s lr applies as given
PLATEAU_FACTOR = 0.1  # the report's ReduceLROnPlateau settings
PLATEAU_PATIENCE = 5  # epochs
# Steps run before the timed training: the first compiles, the next ones are where CUDA
# graphs (reduce-overhead) record and replay. A failure in any of them falls back to eager.
COMPILE_WARMUP_STEPS = 3
COMPILE_FAILURES: dict[tuple[str, str], str] = {}  # (device type, mode) -> why it failed


def parameter_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights; on batch-norm parameters and biases only
    when the recipe asks (`decay_norm_and_bias`)."""
    if config.decay_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": config.weight_decay}]
    decay, rest = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else rest).append(p)  # 1-d: batch-norm scales/shifts, biases
    return [{"params": decay, "weight_decay": config.weight_decay},
            {"params": rest, "weight_decay": 0.0}]


def make_optimizer(config: TrainConfig, model: nn.Module, steps_per_epoch: int):
    """(optimizer, scheduler, whether the scheduler steps per batch)."""
    on_cuda = next(model.parameters()).is_cuda
    groups = parameter_groups(model, config)
    if config.recipe in ("reference", "paper"):
        optimizer = torch.optim.Adam(groups, lr=config.lr,
                                     fused=on_cuda and config.recipe == "paper",
                                     capturable=on_cuda and config.cuda_graph)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE)
        return optimizer, scheduler, False
    # Linear scaling keeps one `lr` right for the smoke profile's batch 64 and the full
    # profile's 512 alike: SGD with momentum diverges at batch 64 with batch 512's rate.
    lr = config.lr * config.batch_size / FAST_REFERENCE_BATCH
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True,
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

    def resize(self, total: int) -> None:
        """End the decay at `total` steps instead (a time budget chose the epochs)."""
        self.total, self.warmup = total, min(self.warmup, total // 4)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


class WeightEMA:
    """An exponential moving average of a model's parameters, in a copy of the model.

    Each update lerps the average toward the weights by 1 - d, d = min(decay, (1 + n) /
    (EMA_WARMUP + n)), so the random initial weights wash out of short runs. Buffers (the
    batch-norm statistics) are copied, not averaged; a host-side counter avoids device syncs.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        self._params, self._avg_params = list(model.parameters()), list(self.model.parameters())
        self._buffers, self._avg_buffers = list(model.buffers()), list(self.model.buffers())

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


def compile_step(model: nn.Module, warm_up: Callable[[nn.Module, int], None],
                 device: torch.device, mode: str) -> tuple[nn.Module, float, bool]:
    """(step model, seconds, fell back): `model` compiled with static shapes, then driven by
    `warm_up(compiled, COMPILE_WARMUP_STEPS)`, the loop's own step, so that compiling and
    CUDA-graph recording stay out of the timed training. The warm-up touches no weights:
    its gradients are dropped and the batch-norm statistics it moved are put back.

    Compilation fails in machine-dependent ways (no C++ compiler or Triton, an unsupported
    operator, out of memory while autotuning, a failed capture). Training does not need it:
    a failure logs a warning, returns (model, seconds spent, True), and is remembered, so
    later runs on the same device type and mode train eager without retrying.
    """
    key = (device.type, mode)
    if key in COMPILE_FAILURES:
        log.warning("torch.compile(mode=%s) failed earlier in this process (%s): training "
                    "eager", mode, COMPILE_FAILURES[key])
        return model, 0.0, True
    started = time.perf_counter()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    fell_back = False
    try:
        # A clean slate: this run's compile time is its own, and graphs of an earlier run
        # count neither as its recompiles nor against torch's recompile limit.
        torch._dynamo.reset()
        # Batch sizes are fixed per run: a static graph, no symbolic batch dimension and
        # no recompiles when another size was compiled earlier in the same process.
        compiled = torch.compile(model, dynamic=False, mode=mode)
        warm_up(compiled, COMPILE_WARMUP_STEPS)
        synchronize(device)
    except Exception as exc:  # any failure leaves eager training intact
        COMPILE_FAILURES[key] = f"{type(exc).__name__}: {exc}"
        log.warning("torch.compile(mode=%s) failed during warm-up, training eager instead: "
                    "%s", mode, COMPILE_FAILURES[key])
        compiled, fell_back = model, True
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what a failed autotune or capture left behind
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    return compiled, time.perf_counter() - started, fell_back


class GraphedStep:
    """`paper`'s whole step as one CUDA graph (`cuda_graph`): the batch gathered from the
    resident split by index, augmented, the forward and backward passes and Adam's update,
    one launch per batch instead of hundreds.

    What the graph touches stays where it was captured: each batch's indices are copied into
    `index`, each parameter group's learning rate is a tensor of its own (refilled from a
    scheduler that replaced it), and Adam runs `capturable`. Augmentation in the graph draws
    from the default CUDA generator, which graphs replay safely, seeded from (seed, epoch):
    a resumed run sees the batches an uninterrupted one would have. The warm-up and the
    capture leave the weights, the batch-norm statistics and Adam's state as they were.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer, loader, bf16: bool):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.loader, self.bf16 = loader, bf16
        self.index = torch.zeros(loader.batch_size, dtype=torch.long, device=loader.device)
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=loader.device)
        self.lrs = [group["lr"] for group in optimizer.param_groups]
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        moments = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        try:
            # Capture and replay on the run's GPU, whichever is this thread's current one.
            with torch.cuda.device(loader.device):
                side = torch.cuda.Stream()  # warm-up steps, as capture requires, on the side
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(COMPILE_WARMUP_STEPS):
                        optimizer.zero_grad(set_to_none=True)
                        self._step()
                torch.cuda.current_stream().wait_stream(side)
                optimizer.zero_grad(set_to_none=True)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.loss, self.hits = self._step()
        finally:
            model.load_state_dict(weights)
            for p, state in optimizer.state.items():
                for k, v in state.items():
                    if p in moments:
                        v.copy_(moments[p][k])
                    else:  # a fresh Adam: its state starts at zero
                        v.zero_()

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.batch(self.index)  # the default generator: see the class
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16,
                            cache_enabled=False):  # autocast's cache cannot live in a graph
            out = self.model(x)
            loss = self.criterion(out, y)
        loss.backward()
        self.optimizer.step()
        return loss.detach().float(), (out.detach().argmax(1) == y).sum()

    def steps(self, epoch: int, batches: Iterable[torch.Tensor]):
        """Replay the graph for each batch of indices: (loss, correct, images) after each."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            if group["lr"] is not lr:
                lr.fill_(float(group["lr"]))
                group["lr"] = lr
        device = self.loader.device
        with torch.cuda.device(device):  # Not the epoch's own seed, which draws its order.
            torch.cuda.manual_seed(epoch_seed(self.loader.seed, epoch) + 1)
        for idx in batches:
            self.index.copy_(idx)
            with torch.cuda.device(device):
                self.graph.replay()
            yield self.loss, self.hits, idx.shape[0]


def graph_step(model: nn.Module, criterion: nn.Module, optimizer, loader,
               bf16: bool) -> tuple[GraphedStep | None, float]:
    """(the graphed step, seconds spent capturing it); None when capture failed, which
    logs a warning: training then runs the plain step."""
    started = time.perf_counter()
    try:
        graphed = GraphedStep(model, criterion, optimizer, loader, bf16)
        synchronize(loader.device)
    except Exception as exc:  # the plain step still trains
        log.warning("capturing the step as a CUDA graph failed, training without: %s: %s",
                    type(exc).__name__, exc)
        graphed = None
        torch.cuda.empty_cache()
    return graphed, time.perf_counter() - started


def compile_counts() -> tuple[int, int]:
    """(frames dynamo compiled, graphs inductor did not capture as CUDA graphs), counted by
    torch itself since the process began: whatever TORCH_LOGS says, unlike its logs."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], counters["inductor"]["cudagraph_skips"]
