"""Inference: labels and class probabilities from uint8 images, normalised as in training."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.augment import normalize


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but this machine has no CUDA device")
    return resolved


def to_device_images(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 NHWC from numpy or torch -> (N, 3, 32, 32) uint8 on `device`."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (32, 32, 3):
        raise ValueError(
            f"expected uint8 images of shape (N, 32, 32, 3), got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    return images.to(device, non_blocking=True).permute(0, 3, 1, 2)  # (N, 3, 32, 32)


@torch.no_grad()
def logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 1000,
    tta: bool = False,
    bf16: bool = False,
    channels_last: bool = False,
) -> torch.Tensor:
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


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, accuracy) as 0-d device tensors: no host sync here."""
    y = logits(model, images, **kwargs)
    loss = F.cross_entropy(y, labels)
    acc = (y.argmax(1) == labels).float().mean()
    return loss, acc


def predict(
    model: nn.Module,
    images_uint8: np.ndarray | torch.Tensor,
    batch_size: int = 1000,
    tta: bool = False,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) int64 and probabilities (N, 10) float32 for (N, 32, 32, 3) uint8 images.

    Runs on `device` (default: where the model's parameters are). Evaluation-mode batch
    norm makes every image independent of the others, so the result does not depend on
    `batch_size`. `precision="bf16"` trades a little exactness for speed on a GPU.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if device is None:
        device = next(model.parameters()).device
    device = resolve_device(device)
    model = model.to(device)
    x = to_device_images(images_uint8, device)  # (N, 3, 32, 32) uint8
    y = logits(model, x, batch_size=batch_size, tta=tta, bf16=precision == "bf16")
    probs = torch.softmax(y, dim=1)
    return probs.argmax(1).cpu().numpy().astype(np.int64), probs.cpu().numpy().astype(np.float32)
