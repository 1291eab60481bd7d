"""The MLflow model registry: register a trained network, resolve and load a model URI,
and move the `champion`, `deep` and `light` aliases.

A version's weights are a plain state_dict file (`weights.pt`) whose sha256 is recorded
in the version's tags and in the pyfunc model config when it is registered; every load
checks it and uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import requests
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from model.checkpoint import load_weights, save_weights
from model.nets import build_model
from tasks.settings import REGISTERED_MODEL

CHAMPION = "champion"
WEIGHTS_ARTIFACT = "weights"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class RegistryError(LookupError):
    """A model name, alias or version that the registry does not hold, or a bad URI."""


class RegistrationError(RuntimeError):
    """The tracking server did not take a new version, after MLflow's HTTP retries (their
    number and backoff: MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR).
    A version is created with all its tags in one call, so none is left half-registered."""


@dataclass(frozen=True)
class LoadedModel:
    network: torch.nn.Module
    name: str
    version: str
    run_id: str
    variant: str
    weights_sha256: str
    tags: dict[str, str]


def register(
    network: torch.nn.Module,
    *,
    variant: str,
    tags: dict[str, str],
    tta: bool,
    name: str = REGISTERED_MODEL,
) -> mlflow.entities.model_registry.ModelVersion:
    """Log `network` to the active MLflow run as a pyfunc model and register a new version.

    `tags` (recipe, data digest, validation accuracy...) are set on the version along with
    `variant` and `weights_sha256`. Raises RegistrationError when the tracking server cannot
    be reached.
    """
    try:
        return _register(network, variant=variant, tags=tags, tta=tta, name=name)
    except (MlflowException, OSError, requests.RequestException) as exc:
        raise RegistrationError(
            f"could not register a {variant} version of {name!r} at "
            f"{mlflow.get_tracking_uri()}: {exc}. The checkpoint is kept: rerun with the "
            "same run key once the tracking server is back"
        ) from exc


def _register(network: torch.nn.Module, *, variant: str, tags: dict[str, str], tta: bool,
              name: str) -> mlflow.entities.model_registry.ModelVersion:
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        sha = save_weights(network, weights)
        example = np.zeros((2, 32, 32, 3), dtype=np.uint8)
        signature = infer_signature(example, np.zeros((2, 10), dtype=np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={WEIGHTS_ARTIFACT: str(weights)},
                model_config={"variant": variant, "weights_sha256": sha, "tta": tta},
                signature=signature,
                input_example=example,
                # Explicit requirements: inferring them would import and run the model.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "mlflow"],
            )
    # The version is created with its tags in one call: no version is ever visible without
    # the variant and checksum that loading it depends on.
    all_tags = {**{k: str(v) for k, v in tags.items()}, "variant": variant, "weights_sha256": sha}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return mlflow.register_model(info.model_uri, name, tags=all_tags)


def resolve(model_uri: str) -> mlflow.entities.model_registry.ModelVersion:
    """`models:/name@alias` or `models:/name/version` -> the registry's ModelVersion."""
    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise RegistryError(
            f"{model_uri!r} is not a registry URI: use models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    name, alias, version = match["name"], match["alias"], match["version"]
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(
            f"no registered model named {name!r} at {mlflow.get_tracking_uri()}; "
            f"registered models: {known or 'none'}"
        ) from exc
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        aliases = sorted(client.get_registered_model(name).aliases)
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise RegistryError(
            f"model {name!r} has no {what}; its aliases are {aliases or 'none'} "
            "(train a model first, or pick one with `cifar-pipeline models`)"
        ) from exc


def load(model_uri: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Resolve `model_uri`, download its weights, check their sha256 and rebuild the net."""
    mv = resolve(model_uri)
    tags = dict(mv.tags)
    try:
        variant, sha = tags["variant"], tags["weights_sha256"]
    except KeyError as exc:
        raise RegistryError(f"{mv.name} version {mv.version} lacks the tag {exc}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        # The logged model's directory: the weights plus a few small MLflow files.
        root = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp)
        path = Path(root) / "artifacts" / "weights.pt"
        network = load_weights(build_model(variant), path, expected_sha256=sha)
    return LoadedModel(network.to(device).eval(), mv.name, str(mv.version), mv.run_id or "",
                       variant, sha, tags)


def version_accuracy(mv) -> float:
    return float(mv.tags.get("val_acc", "nan"))


def current_champion(name: str = REGISTERED_MODEL):
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def set_alias(alias: str, version: str, name: str = REGISTERED_MODEL) -> None:
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))
