"""The MLflow pyfunc flavour of a registered network, logged as code, not as a pickle.

`load_context` imports the `inference_code` artifact (tasks/inference_code.py) under a
fresh module name, never through sys.path, so this project need not be installed and a
user's `model.py` is never picked up; it loads the `weights` state_dict with
`weights_only=True` after checking its sha256. Nothing from the artifact store is
unpickled. Bad input raises INVALID_PARAMETER_VALUE, which the scoring server answers
with HTTP 400.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import set_model

IMAGE_SHAPE = (32, 32, 3)
# One request at most: a bigger batch is a client bug or an attempt to exhaust memory.
MAX_IMAGES = 10_000


class CifarResNet(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        package = _import_package(Path(context.artifacts["inference_code"]))
        nets = importlib.import_module(f"{package}.nets")
        checkpoint = importlib.import_module(f"{package}.checkpoint")
        self._predict = importlib.import_module(f"{package}.predict")

        config = context.model_config or {}
        self.device = self._predict.resolve_device("auto")
        self.tta = bool(config.get("tta", False))
        network = nets.build_model(config["variant"])
        try:
            checkpoint.load_weights(network, context.artifacts["weights"],
                                    config["weights_sha256"])
        except checkpoint.CheckpointError as exc:
            # The copy's exception class is private to this load: raise one callers know.
            raise MlflowException(str(exc)) from exc
        # Batch norm folded into the convs once here, not on every request.
        self.network = self._predict.inference_model(network, self.device)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        images = check_images(model_input)
        _, probabilities = self._predict.predict(self.network, images, tta=self.tta,
                                                 device=self.device, fuse=False)
        return probabilities


def check_images(model_input) -> np.ndarray:
    """(N, 32, 32, 3) uint8 with 1 <= N <= MAX_IMAGES, or an MlflowException naming what
    is wrong (HTTP 400 from the scoring server)."""
    if hasattr(model_input, "to_numpy"):  # a pandas DataFrame: a JSON body without a tensor
        raise _invalid(
            "expected a tensor of uint8 images of shape (N, 32, 32, 3), got a table with "
            f"columns {list(model_input.columns)[:5]}: send {{\"inputs\": [...]}} with one "
            "32x32x3 nested list of integers 0..255 per image")
    try:
        images = np.asarray(model_input)
    except (TypeError, ValueError) as exc:
        raise _invalid(f"input is not an array of images: {exc}") from None
    if images.size == 0 and images.shape[:1] in ((0,), ()):
        raise _invalid("the batch is empty: send at least one image")
    if images.dtype == object:
        raise _invalid("images differ in shape or hold non-numbers: every image must be "
                       "32x32x3 integers 0..255")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise _invalid(f"expected images of shape (N, 32, 32, 3), got shape {images.shape}")
    if images.shape[0] > MAX_IMAGES:
        raise _invalid(f"{images.shape[0]} images in one request, at most {MAX_IMAGES}: "
                       "split the batch")
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind not in "iu":
        raise _invalid(f"expected uint8 pixel values 0..255, got dtype {images.dtype}")
    low, high = int(images.min()), int(images.max())
    if low < 0 or high > 255:
        raise _invalid(f"pixel values must be 0..255, got values from {low} to {high}")
    return images.astype(np.uint8)


def _invalid(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def _import_package(directory: Path) -> str:
    """Import the package at `directory` under a name no other code uses; return it.

    A fresh name per load: two versions loaded in one process each run their own copy."""
    name = f"_cifar10_resnet_inference_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(
        name, directory / "__init__.py", submodule_search_locations=[str(directory)])
    if spec is None or spec.loader is None:
        raise MlflowException(f"the model's inference code is missing from {directory}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return name


set_model(CifarResNet())
