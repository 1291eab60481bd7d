"""Inference: labels and class probabilities from uint8 images, normalised as in training."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.augment import normalize
from model.errors import UserError
from model.nets import fuse_for_inference

# Images per forward pass on the CPU: small batches keep each layer's activations in
# cache. On one core of a 2-core EPYC, folded channels-last light ran at 109 images/s with
# 32 (16 and 64 alike) and 100 with 128; the old path (unfolded, NCHW, 1000) at 79.
CPU_BATCH = 32


class DeviceError(UserError, ValueError):
    """A device this machine lacks. Not model.config's ConfigError: a logged model carries
    this module, and model.config would bring the data loaders with it."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for, but this machine has no CUDA device")
    return resolved


def to_device_images(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 NHWC from numpy or torch -> (N, 3, 32, 32) uint8 on `device`."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (32, 32, 3):
        raise ValueError(f"expected uint8 images of shape (N, 32, 32, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (N, 3, 32, 32)


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, *, batch_size: int = 1000, tta: bool = False,
           bf16: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Float32 logits (N, 10) for uint8 NCHW `images` already on the model's device.

    With `tta`, the logits of each image and its mirror image are averaged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalize(images[start : start + batch_size])  # (B, 3, 32, 32) float32
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
                y = model(x).float()
                if tta:
                    y = 0.5 * (y + model(x.flip(-1)).float())
            out.append(y)
    finally:
        model.train(was_training)
    if not out:
        return torch.empty((0, 10), device=images.device)
    return torch.cat(out)


def _cpu_logits(model: nn.Module, images: torch.Tensor, batch_size: int, tta: bool,
                bf16: bool, threads: int) -> torch.Tensor:
    """`logits` as `threads` single-threaded streams over consecutive runs of batches.

    Each stream owns a core and never waits for another, where one multi-threaded stream
    meets every thread at the end of every op: on a small machine shared with other work,
    one descheduled thread would stall the rest. OpenMP settings are per thread, so
    `set_num_threads(1)` in a worker leaves the caller's setting alone.
    """
    kwargs = dict(batch_size=batch_size, tta=tta, bf16=bf16, channels_last=True)
    n_batches = -(-images.shape[0] // batch_size)
    streams = max(1, min(threads, n_batches))
    if streams == 1:
        return logits(model, images, **kwargs)
    bounds = [batch_size * (n_batches * i // streams) for i in range(1, streams)]
    parts = torch.tensor_split(images, bounds)

    def stream(part: torch.Tensor) -> torch.Tensor:
        torch.set_num_threads(1)
        return logits(model, part, **kwargs)

    was_training = model.training
    model.eval()  # here, once: the streams must not toggle a shared module's mode
    try:
        with ThreadPoolExecutor(streams) as pool:
            return torch.cat(list(pool.map(stream, parts)))
    finally:
        model.train(was_training)


def inference_model(model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """A copy of `model` for fast evaluation on `device` (default: where `model` is): batch
    norm folded into the convolutions, weights channels-last (the layout oneDNN on the CPU and
    cuDNN's tensor cores run fastest in). Give it to `predict(..., fuse=False)` to prepare
    once and predict many times."""
    device = resolve_device(next(model.parameters()).device if device is None else device)
    return fuse_for_inference(model).to(device, memory_format=torch.channels_last)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) as 0-d device tensors: no host sync here."""
    y = logits(model, images, **kwargs)
    return F.cross_entropy(y, labels), (y.argmax(1) == labels).float().mean()


def predict(
    model: nn.Module, images_uint8: np.ndarray | torch.Tensor, batch_size: int = 1000,
    tta: bool = False, device: str | torch.device | None = None, precision: str = "fp32",
    fuse: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) int64 and probabilities (N, 10) float32 for (N, 32, 32, 3) uint8 images,
    on `device` (default: where the model is). Evaluation-mode batch norm keeps images
    independent, so `batch_size` (at most CPU_BATCH on the CPU) bounds each forward pass
    without changing the result. `fuse=False` when `model` already is an inference_model.
    On the CPU, torch.get_num_threads() single-threaded streams share the batches."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = resolve_device(next(model.parameters()).device if device is None else device)
    model = inference_model(model, device) if fuse else model.to(device)
    x = to_device_images(images_uint8, device)  # (N, 3, 32, 32) uint8
    bf16 = precision == "bf16"
    if device.type == "cpu":
        y = _cpu_logits(model, x, min(batch_size, CPU_BATCH), tta, bf16, torch.get_num_threads())
    else:
        y = logits(model, x, batch_size=batch_size, tta=tta, bf16=bf16, channels_last=True)
    return labels_and_probabilities(y)


def labels_and_probabilities(logits_: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) int64 and softmax probabilities (N, 10) float32, on the host."""
    probs = torch.softmax(logits_, dim=1)
    return probs.argmax(1).cpu().numpy().astype(np.int64), probs.cpu().numpy().astype(np.float32)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU. For timing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
