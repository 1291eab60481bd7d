"""Atomic checkpoints and weight files, and the training state they hold.

Everything is saved with `torch.save` and read back with `torch.load(weights_only=True)`,
which refuses to unpickle anything but tensors and plain containers: a checkpoint or a
weights file from object storage can never run code on load.

Training checkpoints are written on a background thread (`CheckpointWriter`): the training
thread only copies the state to host memory, so a GPU epoch of about a second does not wait
for a disk fsync and an upload.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model.errors import UserError
from model.fileio import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weights file is unreadable or belongs to another configuration."""


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through atomic_write: a crash leaves the previous file or the new one."""
    path = Path(path)
    with atomic_write(path) as f:
        torch.save(obj, f)
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
    if expected_sha256 is not None and (actual := file_sha256(path)) != expected_sha256:
        raise CheckpointError(
            f"{path} has sha256 {actual}, but {expected_sha256} was recorded when it was "
            "written: the file was changed or corrupted, refusing to load it")
    state = load(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {exc}") from exc
    return model


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --- training state -------------------------------------------------------------------------


def _to_host(obj: Any) -> Any:
    """A copy of `obj` whose tensors live in host memory: what the background writer saves
    while the training thread goes on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def training_state(config, model, optimizer, scheduler, ema, epoch, history) -> dict[str, Any]:
    """Everything a resume needs, every RNG included, copied to host memory."""
    _, key, pos, _, _ = np.random.get_state()
    return _to_host({
        "format": FORMAT,
        "config": config.to_dict(),
        "config_hash": config.hash(),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "history": list(history),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            # A tensor keeps the checkpoint loadable with weights_only=True.
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos)},
        },
    })


def restore_training_state(state, config, model, optimizer, scheduler, ema, path) -> None:
    if state.get("config_hash") != config.hash():
        raise CheckpointError(f"{path} was written by another configuration (hash "
                              f"{state.get('config_hash')}, this one is {config.hash()}): use "
                              "a fresh checkpoint directory or the same config")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        if state.get("ema") is None:
            raise CheckpointError(
                f"{path} has no weight average although its configuration asks for one: "
                "the checkpoint is incomplete; use a fresh checkpoint directory")
        ema.load_state_dict(state["ema"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", rng["numpy"]["key"].numpy().astype(np.uint32),
                         rng["numpy"]["pos"], 0, 0.0))


class CheckpointWriter:
    """Writes training checkpoints to `path` atomically on a background thread, at most every
    `interval` seconds (0: every time it is asked), then calls `on_written(path)` there too
    (an upload). One write at a time; a failed one is raised on the training thread at the
    next checkpoint or at `close()`. `lost_seconds`: the training thread's time on
    checkpoints (the host copy, waiting for an earlier write)."""

    def __init__(self, path: Path, interval: float,
                 on_written: Callable[[Path], None] | None = None):
        self.path, self.interval, self.on_written = Path(path), interval, on_written
        self.lost_seconds, self.written = 0.0, 0
        self._last = time.monotonic()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def due(self, last_epoch: bool) -> bool:
        return last_epoch or time.monotonic() - self._last >= self.interval

    def submit(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Take the state now (`snapshot()` on this thread), write it in the background."""
        started = time.perf_counter()
        self._join()
        state = snapshot()
        self._thread = threading.Thread(target=self._write, args=(state,),
                                        name="checkpoint-writer", daemon=True)
        self._thread.start()
        self._last = time.monotonic()
        self.lost_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Wait for the last write (and upload); raise its failure if it failed."""
        started = time.perf_counter()
        try:
            self._join()
        finally:
            self.lost_seconds += time.perf_counter() - started

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, state: dict[str, Any]) -> None:
        try:
            save_atomic(state, self.path)
            if self.on_written is not None:
                self.on_written(self.path)
            self.written += 1
        except BaseException as exc:  # re-raised on the training thread
            self._error = exc
