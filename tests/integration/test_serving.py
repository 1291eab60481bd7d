"""`cifar-pipeline serve` (MLflow's scoring server) on the champion, asked over real HTTP:
uint8 images in, ten probabilities per image out, and bad input answered 400 with what is
wrong, never a 500.

The served version is an untrained light network registered through the project's own
registry code (no training: the server, not the accuracy, is under test). The server runs
from a directory holding a user's `model.py`, which must never be imported.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(pipeline_env, spawn, free_port, tmp_path_factory):
    import mlflow
    import torch

    from model.nets import build_model
    from tasks import registry
    from tasks.settings import Settings

    settings = Settings.from_env()
    settings.apply()
    torch.manual_seed(0)
    with mlflow.start_run():
        mv = registry.register(build_model("light").eval(), variant="light",
                               tags={"val_acc": "0.1"}, tta=False)
    registry.set_alias(registry.CHAMPION, mv.version)
    local = mlflow.pyfunc.load_model("models:/cifar10-resnet@champion")

    cwd = tmp_path_factory.mktemp("serve-cwd")
    sentinel = cwd / "user-model-was-imported"
    (cwd / "model.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = Path(sys.executable).with_name("cifar-pipeline")
    spawn("cifar-pipeline-serve", [str(cli), "serve", "--port", str(port)], f"{url}/ping",
          env={**os.environ, "MLFLOW_TRACKING_URI": settings.tracking_uri}, cwd=cwd,
          timeout=240)
    yield {"url": url, "local": local, "sentinel": sentinel}


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_uint8_images_get_ten_probabilities_each(served):
    images = _images(3)
    status, body = _post(served["url"], json.dumps({"inputs": images.tolist()}).encode())
    assert status == 200, body
    probabilities = np.array(json.loads(body)["predictions"])
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(probabilities, served["local"].predict(images), atol=1e-5)
    assert not served["sentinel"].exists()


@pytest.mark.parametrize(("payload", "message"), [
    ({"inputs": np.zeros((2, 3, 32, 32), int).tolist()},
     "expected images of shape (N, 32, 32, 3), got shape (2, 3, 32, 32)"),
    ({"inputs": np.full((1, 32, 32, 3), 0.5).tolist()}, "got dtype float64"),
    ({"inputs": np.full((1, 32, 32, 3), 300).tolist()},
     "pixel values must be 0..255, got values from 300 to 300"),
    ({"inputs": np.full((1, 32, 32, 3), -2).tolist()}, "got values from -2 to -2"),
    ({"inputs": []}, "the batch is empty"),
    ({"dataframe_split": {"columns": ["a"], "data": [[1]]}}, 'send {"inputs": [...]}'),
])
def test_bad_input_is_a_400_that_names_the_problem(served, payload, message):
    status, body = _post(served["url"], json.dumps(payload).encode())
    assert status == 400, body
    error = json.loads(body)
    assert error["error_code"] == "INVALID_PARAMETER_VALUE"
    assert message in error["message"]
    assert "Traceback" not in body and "stack_trace" not in error


def test_a_body_that_is_not_json_is_a_400(served):
    status, body = _post(served["url"], b"\xff{not json")
    assert status == 400 and "valid JSON" in json.loads(body)["message"]
