"""`cifar-pipeline predict` and `score` through the command line, against a registered
(untrained) light network as champion: PNG and JPEG files made here, a folder of them, a
competition pickle, bad files reported and skipped; and a bad scoring input refused
before the scoring flow (and Prefect's temporary server) could start."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from flows.cli import main
from model.data import CLASSES, write_competition_pickle
from model.images import load_image
from model.nets import build_model
from model.predict import predict
from tasks import registry
from tasks.settings import Settings


@pytest.fixture(scope="module")
def state_dir(module_state: Path) -> Path:
    return module_state  # one registered model serves every test here


@pytest.fixture(scope="module")
def network(module_state: Path) -> torch.nn.Module:
    Settings.from_env().apply()
    torch.manual_seed(0)
    net = build_model("light").eval()
    with mlflow.start_run(run_name="register light for predict"):
        mv = registry.register(net, variant="light", tta=False, tags={"val_acc": "0.1"})
    registry.set_alias(registry.CHAMPION, str(mv.version))
    return net


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder with a 32x32 PNG, a 200x120 JPEG, a grayscale PNG and a text file."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(
        folder / "b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / "c.png")
    (folder / "readme.txt").write_text("not an image, and not named like one")
    return folder


def _predict(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_a_folder_of_png_and_jpeg_files_as_json(network, images, state_dir, capsys):
    code, out, err = _predict(capsys, str(images), "--json", "--no-tta",
                              "--state-dir", str(state_dir))
    assert code == 0, err
    result = json.loads(out)
    files = [images / "a.png", images / "b.jpg", images / "c.png"]
    assert [r["file"] for r in result["predictions"]] == [str(f) for f in files]
    labels, probabilities = predict(network, np.stack([load_image(f) for f in files]))
    for row, label, p in zip(result["predictions"], labels, probabilities, strict=True):
        assert row["class"] == CLASSES[label] and row["label"] == label
        assert row["confidence"] == pytest.approx(float(p[label]), abs=1e-5)
        assert list(row["probabilities"]) == list(CLASSES)
    assert result["model"]["version"] == "1" and result["failed"] == []


@pytest.mark.slow
def test_an_unreadable_file_is_reported_and_skipped(network, images, capsys):
    (images / "broken.png").write_text("ID,Labels\n")
    missing = images / "missing.jpg"
    code, out, err = _predict(capsys, str(images / "a.png"), str(images / "broken.png"),
                              str(missing), str(images / "b.jpg"))
    assert code == 1  # some failed
    assert f"error: {images / 'broken.png'}: not a PNG or JPEG image" in err
    assert f"error: {missing}: no such file or folder" in err
    assert "2 input(s) failed, 2 image(s) classified" in err
    # The table: a header naming the model, then file, class and confidence per image.
    lines = out.strip().splitlines()
    assert lines[0].startswith("cifar10-resnet version 1 (light)")
    assert lines[1].split() == ["file", "class", "confidence"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == [str(images / "a.png"), str(images / "b.jpg")]
    assert all(r[1] in CLASSES and r[2].endswith("%") for r in rows)


@pytest.mark.slow
def test_a_competition_pickle_names_each_image_by_id(network, tmp_path, capsys):
    path = tmp_path / "t.pkl"
    imgs = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_competition_pickle(path, np.array([7, 3, 11]), imgs)
    code, out, err = _predict(capsys, str(path), "--json")
    assert code == 0, err
    assert [r["file"] for r in json.loads(out)["predictions"]] == \
        [f"{path}#7", f"{path}#3", f"{path}#11"]


def test_nothing_readable_is_an_error_before_any_model_is_loaded(tmp_path, capsys,
                                                                  monkeypatch):
    import flows.predict

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded although no input could be read")

    monkeypatch.setattr(flows.predict, "classify", no_model)
    (tmp_path / "x.png").write_bytes(b"GIF89a")
    code, out, err = _predict(capsys, str(tmp_path / "x.png"))
    assert code == 1 and out == ""
    assert "not a PNG or JPEG image" in err and "nothing to classify" in err


def test_score_refuses_a_hostile_pickle_before_the_flow_starts(tmp_path, capsys, monkeypatch):
    sentinel = tmp_path / "payload-ran"
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(f"cos\nsystem\n(Vtouch {sentinel}\ntR.".encode())
    # Importing the scoring flow (which starts Prefect when it runs) now fails loudly.
    monkeypatch.setitem(sys.modules, "flows.score", None)
    code = main(["score", "--input", str(bad), "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and "os.system" in err
    assert not sentinel.exists()


def test_score_refuses_a_malformed_pickle_before_the_flow_starts(tmp_path, capsys,
                                                                 monkeypatch):
    bad = tmp_path / "shape.pkl"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 3, 32, 32), np.uint8),
                                  b"ids": np.arange(2)}))
    monkeypatch.setitem(sys.modules, "flows.score", None)
    code = main(["score", "--state-dir", str(tmp_path / "state"), "--input", str(bad)])
    assert code == 1 and capsys.readouterr().err.startswith("error: ")
