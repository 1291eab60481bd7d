import os
import pickle
from pathlib import Path

import pytest
import torch

from model import checkpoint
from model.nets import build_model


def test_save_atomic_round_trip(tmp_path):
    path = checkpoint.save_atomic({"a": torch.arange(3), "epoch": 2}, tmp_path / "c.pt")
    state = checkpoint.load(path)
    assert state["epoch"] == 2 and torch.equal(state["a"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"epoch": 1}, path)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.sentinel}",))


def test_load_refuses_a_pickle_that_would_run_code(tmp_path):
    Payload.sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(checkpoint.CheckpointError, match="cannot load"):
        checkpoint.load(path)
    assert not Payload.sentinel.exists()


def test_torn_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(path)


def test_weights_round_trip_and_tampering_is_detected(tmp_path):
    model = build_model("light")
    sha = checkpoint.save_weights(model, tmp_path / "w.pt")
    fresh = checkpoint.load_weights(build_model("light"), tmp_path / "w.pt", sha)
    assert all(torch.equal(a, b) for a, b in
               zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    data = bytearray(Path(tmp_path / "w.pt").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "w.pt").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="changed or corrupted"):
        checkpoint.load_weights(build_model("light"), tmp_path / "w.pt", sha)


def test_weights_of_the_other_variant_do_not_fit(tmp_path):
    checkpoint.save_weights(build_model("light"), tmp_path / "w.pt")
    with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
        checkpoint.load_weights(build_model("deep"), tmp_path / "w.pt")
