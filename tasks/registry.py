"""The MLflow model registry: register a trained network, resolve and load a model URI,
and move the `champion`, `deep` and `light` aliases. A version's weights are a state_dict
whose sha256, recorded at registration, every load checks.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import requests
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from model.checkpoint import load_weights, save_weights
from model.data.uri import redact
from model.errors import UserError
from model.nets import build_model, count_parameters
from model.provenance import code_commit
from tasks import model_card
from tasks.inference_code import write_package
from tasks.settings import CHAMPION, REGISTERED_MODEL

if TYPE_CHECKING:
    from model.data import Dataset

WEIGHTS_ARTIFACT = "weights"
CODE_ARTIFACT = "inference_code"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
# PostgreSQL, MySQL and SQLite's words for two inserts of one alias.
_ALIAS_CLASH = re.compile(r"(duplicate|unique).*alias", re.IGNORECASE | re.DOTALL)
# Its "No artifacts found" INFO line would come before the error of `load` that says so.
logging.getLogger("mlflow.store.artifact.artifact_repo").setLevel(logging.WARNING)


class RegistryError(UserError, LookupError):
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


def register(network: torch.nn.Module, *, variant: str, tags: dict[str, str], tta: bool,
             name: str = REGISTERED_MODEL, metrics: Mapping[str, float] | None = None,
             config: Mapping[str, Any] | None = None,
             data: Dataset | None = None) -> mlflow.entities.model_registry.ModelVersion:
    """Log `network` to the active MLflow run as a pyfunc model and register a new version,
    tagged with `tags`, `variant`, `weights_sha256` and the Prefect flow run, its model card
    as description. Raises RegistrationError when the tracking server cannot be reached."""
    try:
        return _register(network, variant=variant, tags=tags, tta=tta, name=name,
                         metrics=dict(metrics or {}), config=dict(config or {}), data=data)
    except (MlflowException, OSError, requests.RequestException) as exc:
        from tasks.settings import disk_error_message

        why = disk_error_message(exc) or (f"{exc}. The checkpoint is kept: rerun with the "
                                          "same run key once the tracking server is back")
        raise RegistrationError(f"could not register a {variant} version of {name!r} at "
                                f"{redact(mlflow.get_tracking_uri())}: {why}") from exc


def _register(network: torch.nn.Module, *, variant: str, tags: dict[str, str], tta: bool,
              name: str, metrics: dict[str, float], config: dict[str, Any],
              data: Dataset | None) -> mlflow.entities.model_registry.ModelVersion:
    client = mlflow.MlflowClient()
    run = mlflow.active_run()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        sha = save_weights(network, weights)
        weights_bytes = weights.stat().st_size
        code = write_package(Path(tmp) / "code")
        example = np.zeros((1, 32, 32, 3), dtype=np.uint8)
        # Outputs only: with an input schema, MLflow casts JSON input to uint8 before the
        # model sees it (1.5 becomes 1, silently); the model checks its input itself and
        # names what is wrong. The input example shows the format.
        signature = ModelSignature(outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts={WEIGHTS_ARTIFACT: str(weights), CODE_ARTIFACT: str(code)},
                model_config={"variant": variant, "weights_sha256": sha, "tta": tta},
                signature=signature,
                input_example=example,
                # Explicit requirements: inferring them would import and run the model.
                # The copied inference code needs nothing else (tasks/inference_code.py).
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                  f"numpy=={np.__version__}",
                                  f"mlflow=={mlflow.__version__}"],
                params={k: str(v) for k, v in config.items()} or None,
            )
    step = max(int(metrics.get("epochs", 1)) - 1, 0)
    final = {f"final/{k}": float(v) for k, v in metrics.items()}
    if final and run is not None:
        # The model page shows these; the run already has the same values at the same step.
        mlflow.log_metrics(final, step=step, model_id=info.model_id)
    flow_run_id, flow_run_url = model_card.prefect_flow_run()
    flow_tags = {model_card.FLOW_RUN_TAG: flow_run_id, model_card.FLOW_RUN_URL_TAG: flow_run_url}
    flow_tags = {k: v for k, v in flow_tags.items() if v}
    run_id = run.info.run_id if run is not None else None
    if run_id and flow_tags:
        mlflow.set_tags(flow_tags)
    facts = model_card.CardFacts(
        name=name, variant=variant, tta=tta, params=count_parameters(network),
        weights_bytes=weights_bytes, weights_sha256=sha, device=model_card.device_name(network),
        git_commit=code_commit(), model_id=info.model_id, run_id=run_id,
        run_url=model_card.mlflow_run_url(mlflow.get_tracking_uri(), run.info.experiment_id,
                                          run_id) if run is not None else None,
        flow_run_id=flow_run_id, flow_run_url=flow_run_url, config=config, metrics=metrics,
        data={} if data is None else {
            "source": data.source, "digest": data.digest, "val_digest": data.val.digest,
            "train_images": len(data.train), "val_images": len(data.val)})
    _ensure_registered_model(client, name)
    # The version is created with its tags and card in one call: no version is ever visible
    # without the variant and checksum that loading it depends on.
    all_tags = {**{k: str(v) for k, v in tags.items()}, **flow_tags, "variant": variant,
                "weights_sha256": sha}
    mv = client.create_model_version(
        name, source=info.model_uri, run_id=run_id, tags=all_tags,
        description=model_card.version_description(facts), model_id=info.model_id)
    # What mlflow.register_model records too: the logged model's page links to the version.
    client.set_logged_model_tags(info.model_id, {"mlflow.model_versions": json.dumps(
        [{"name": mv.name, "version": mv.version}])})
    return mv


def _ensure_registered_model(client: mlflow.MlflowClient, name: str) -> None:
    try:
        current = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description=model_card.MODEL_DESCRIPTION)
        except MlflowException as race:
            if race.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        return
    if not current.description:
        client.update_registered_model(name, description=model_card.MODEL_DESCRIPTION)


def resolve(model_uri: str) -> mlflow.entities.model_registry.ModelVersion:
    """`models:/name@alias` or `models:/name/version` -> the registry's ModelVersion."""
    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise RegistryError(f"{model_uri!r} is not a registry URI: use models:/NAME@ALIAS or "
                            "models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(
            f"no registered model named {name!r} at {redact(mlflow.get_tracking_uri())}; "
            f"registered models: {known or 'none'}") from exc
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        aliases = sorted(client.get_registered_model(name).aliases)
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise RegistryError(
            f"model {name!r} has no {what}; its aliases are {aliases or 'none'} "
            "(train a model first, or pick one with `cifar-pipeline models`)") from exc


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
        try:
            root = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp)
            path = Path(root) / "artifacts" / "weights.pt"
            path.stat()
        except Exception as exc:  # gone, or its store does not answer: say which version
            why = ("weights.pt is missing" if isinstance(exc, FileNotFoundError)
                   else f"{type(exc).__name__}: {exc}")
            where = mlflow.MlflowClient().get_model_version_download_uri(mv.name, mv.version)
            raise RegistryError(f"{mv.name} version {mv.version}: its files at {where} "
                                f"cannot be read ({why})") from exc
        network = load_weights(build_model(variant), path, expected_sha256=sha)
    return LoadedModel(network.to(device).eval(), mv.name, str(mv.version), mv.run_id or "",
                       variant, sha, tags)


def current_champion(name: str = REGISTERED_MODEL):
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def set_alias(alias: str, version: str, name: str = REGISTERED_MODEL) -> None:
    """Point `alias` at `version`. MLflow's SQL store adds a new alias by reading, then
    inserting, so two runs that set one alias at once (two parents with the same run key)
    can meet on its primary key; the loser tries again, finds the row and updates it."""
    for attempt in range(3):
        try:
            return mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))
        except MlflowException as e:
            if attempt == 2 or not _ALIAS_CLASH.search(str(e)):
                raise
