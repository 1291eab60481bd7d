"""SIGKILL in the middle of training and in the middle of a checkpoint write, on the CPU:
the rerun resumes from the last complete checkpoint and ends with exactly the weights of
an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from model import checkpoint

REPO = Path(__file__).resolve().parents[2]

# Trains light for 3 epochs on synthetic data; optionally sleeps in every step (so a kill
# lands mid-epoch) or tears the second checkpoint write (so a kill lands inside it).
SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np, torch
    from model.data import Dataset, Split
    from model.config import TrainConfig
    from model.train import fit
    from model import checkpoint as ck

    ckpt_dir, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
    rng = np.random.default_rng(0)
    def split(n):
        labels = np.arange(n, dtype=np.int64) % 10
        images = (rng.integers(0, 96, (n, 32, 32, 3)) + labels[:, None, None, None] * 16)
        return Split(images.astype(np.uint8), labels)
    data = Dataset(split(64), split(32), None, tuple("abcdefghij"), "synthetic", "synthetic")
    config = TrainConfig(recipe="fast", variant="light", epochs=3, batch_size=16,
                         device="cpu", workers=0, checkpoint_seconds=0)
    if mode == "slow-steps":
        original = torch.optim.SGD.step
        def slow_step(self, *a, **k):
            time.sleep(0.2)
            return original(self, *a, **k)
        torch.optim.SGD.step = slow_step
    if mode == "torn-write":
        real_save, calls = torch.save, []
        def torn(obj, f, *a, **k):
            calls.append(1)
            if len(calls) == 2:  # the second epoch's checkpoint: half of it, then hang
                f.write(b"half a checkpoint")
                f.flush()
                # One write: this runs on the checkpoint thread while the training thread
                # prints its epochs, and print() writes the text and its newline apart.
                sys.stdout.write("WRITING\\n")
                sys.stdout.flush()
                time.sleep(600)
            return real_save(obj, f, *a, **k)
        torch.save = torn
    def epoch_done(m):
        sys.stdout.write(f"EPOCH {int(m['epoch'])}\\n")
        sys.stdout.flush()

    result = fit(config, data, checkpoint_dir=ckpt_dir, on_epoch_end=epoch_done)
    torch.save({k: v for k, v in result.model.state_dict().items()}, out)
    print("RESUMED_FROM", result.resumed_from_epoch, flush=True)
""")


def _start(tmp_path: Path, ckpt: Path, mode: str, out: Path) -> subprocess.Popen:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(ckpt), mode, str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_for(process: subprocess.Popen, marker: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        if marker in line:
            return
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout} s"
    raise AssertionError(f"the process ended before printing {marker!r}")


def _finish(tmp_path, ckpt, out) -> str:
    process = _start(tmp_path, ckpt, "plain", out)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0, stdout
    return stdout


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("straight")
    _finish(tmp, tmp / "ckpt", tmp / "final.pt")
    return _weights(tmp / "final.pt")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    process = _start(tmp_path, ckpt, "slow-steps", tmp_path / "unused.pt")
    _wait_for(process, "EPOCH 0")
    time.sleep(0.5)  # inside epoch 1 now: its steps sleep 0.2 s each
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.load(ckpt / checkpoint.CHECKPOINT_NAME)["epoch"] == 0
    stdout = _finish(tmp_path, ckpt, tmp_path / "final.pt")
    assert "RESUMED_FROM 0" in stdout and "EPOCH 0" not in stdout
    _assert_same(_weights(tmp_path / "final.pt"), uninterrupted)


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, uninterrupted):
    ckpt = tmp_path / "ckpt"
    process = _start(tmp_path, ckpt, "torn-write", tmp_path / "unused.pt")
    _wait_for(process, "WRITING")
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The torn bytes went to a temporary file; the checkpoint is still epoch 0's, whole.
    assert checkpoint.load(ckpt / checkpoint.CHECKPOINT_NAME)["epoch"] == 0
    stdout = _finish(tmp_path, ckpt, tmp_path / "final.pt")
    assert "RESUMED_FROM 0" in stdout
    _assert_same(_weights(tmp_path / "final.pt"), uninterrupted)
