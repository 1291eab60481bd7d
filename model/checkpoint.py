"""Atomic checkpoints and weight files.

Everything is saved with `torch.save` and read back with `torch.load(weights_only=True)`,
which refuses to unpickle anything but tensors and plain containers: a checkpoint or a
weights file from object storage can never run code on load.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint or weights file is unreadable or belongs to another configuration."""


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then rename over it.

    A crash at any point leaves either the previous file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for torn or foreign files
        raise CheckpointError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict")
    return obj


def save_weights(model: nn.Module, path: str | os.PathLike) -> str:
    """Write the model's state_dict (CPU tensors) atomically; return the file's sha256."""
    model = getattr(model, "_orig_mod", model)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_atomic(state, path)
    return file_sha256(path)


def load_weights(model: nn.Module, path: str | os.PathLike, expected_sha256: str | None = None):
    """Load a state_dict written by `save_weights` into `model`, checking its checksum first."""
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"{path} has sha256 {actual}, but {expected_sha256} was recorded when it was "
                "written: the file was changed or corrupted, refusing to load it"
            )
    state = load(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {exc}") from exc
    return model


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
