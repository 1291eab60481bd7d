"""The MLflow pyfunc flavour of a registered network, logged as code, not as a pickle.

MLflow stores this file with every model version ("models from code"). Loading a version
runs this file and `load_context`, which rebuilds the network from its `variant` and loads
the state_dict with `weights_only=True` after checking the sha256 recorded at registration.
Nothing from the artifact store is ever unpickled.

    model = mlflow.pyfunc.load_model("models:/cifar10-resnet@champion")
    probabilities = model.predict(images_uint8)  # (N, 32, 32, 3) -> (N, 10) float32
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.models import set_model


class CifarResNet(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from model.checkpoint import load_weights
        from model.nets import build_model
        from model.predict import inference_model, resolve_device

        config = context.model_config or {}
        self.device = resolve_device("auto")
        self.tta = bool(config.get("tta", False))
        network = build_model(config["variant"])
        load_weights(network, context.artifacts["weights"], config["weights_sha256"])
        # Batch norm folded into the convs once here, not on every request.
        self.network = inference_model(network, self.device)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from model.predict import predict

        images = np.asarray(model_input, dtype=np.uint8)
        _, probabilities = predict(self.network, images, tta=self.tta, device=self.device,
                                   fuse=False)
        return probabilities


set_model(CifarResNet())
