"""The model card: the Markdown descriptions of the registered model and of each version,
which the MLflow UI shows on their pages. Written once, at registration; a field that is
not known then is left out rather than guessed.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

# The config fields that make a recipe reproducible, in the order a reader looks for them.
KEY_HYPERPARAMETERS = ("recipe", "epochs", "batch_size", "lr", "weight_decay", "momentum",
                       "label_smoothing", "warmup_epochs", "cutout", "ema", "tta",
                       "precision", "seed")
FLOW_RUN_TAG = "prefect_flow_run_id"
FLOW_RUN_URL_TAG = "prefect_flow_run_url"

MODEL_DESCRIPTION = """\
CIFAR-10 classifiers: the ModifiedResNet of the reference report in its two variants,
`deep` (blocks 4, 4, 3; 4,697,162 parameters) and `light` (blocks 2, 2, 2; 2,777,674).
Trained by the cifar-pipeline `train-resnets` flow. Each version's description is its
model card: recipe, data, accuracy, provenance and how to use it.

Aliases: `champion` (the most accurate on the same validation images), `deep` and
`light` (the newest of each variant). The champion is chosen on validation accuracy, so
its validation accuracy reads high; its test accuracy, where a labelled test split was
given, took no part in the choice.

Input: uint8 RGB images, shape (N, 32, 32, 3). Output: (N, 10) class probabilities in
the order airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck.
"""


@dataclass(frozen=True)
class CardFacts:
    """Everything a version's card says; None (or empty) where it is not known."""

    name: str
    variant: str
    tta: bool
    params: int
    weights_bytes: int
    weights_sha256: str
    device: str
    git_commit: str
    model_id: str | None = None  # the logged model: models:/<model_id> is this very model
    run_id: str | None = None
    run_url: str | None = None
    flow_run_id: str | None = None
    flow_run_url: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)


def version_description(facts: CardFacts) -> str:
    """The version's Markdown card."""
    m, c = facts.metrics, facts.config
    out = [f"## {facts.name}: `{facts.variant}` ModifiedResNet, recipe "
           f"`{c.get('recipe', 'unknown')}`", ""]
    out += ["### Accuracy", "", "| split | accuracy |", "|---|---|"]
    for key, label in (("val/acc", "validation"), ("val/acc_tta", "validation, flip TTA"),
                       ("test/acc", "test"), ("test/acc_tta", "test, flip TTA")):
        if key in m:
            out.append(f"| {label} | {100 * float(m[key]):.2f}% |")
    if "val/acc" not in m:
        out.append("| validation | not recorded |")
    out += ["", "Validation accuracy chooses the `champion` (and, in `reference` and `paper`, "
            "steps the learning rate), so it reads high for a chosen version; test accuracy "
            "takes no part in either."]
    tta = ("average each image with its mirror image (flip TTA)" if facts.tta
           else "use each image as it is (no TTA)")
    out += ["", f"Predictions of the logged model {tta}.", ""]
    out += ["### Model", "", "| | |", "|---|---|",
            f"| variant | `{facts.variant}` |",
            f"| parameters | {facts.params:,} ({facts.params * 4 / 2**20:.2f} MB fp32) |",
            f"| weights file | {facts.weights_bytes / 2**20:.2f} MiB, sha256 "
            f"`{facts.weights_sha256}` |", ""]
    hyper = [(k, c[k]) for k in KEY_HYPERPARAMETERS if k in c and c[k] is not None]
    if hyper:
        out += ["### Recipe and hyperparameters", "", "| | |", "|---|---|"]
        out += [f"| {k} | `{v}` |" for k, v in hyper]
        out.append("")
    out += ["### Training", "", "| | |", "|---|---|"]
    if "epochs" in m:
        out.append(f"| epochs | {int(m['epochs'])} |")
    if "train_seconds" in m:
        out.append(f"| training time | {_duration(float(m['train_seconds']))} |")
    out += [f"| device | {facts.device} |", f"| git commit | `{facts.git_commit}` |"]
    d = facts.data
    for key, label in (("source", "data source"), ("digest", "data digest (sha256)"),
                       ("val_digest", "validation digest"), ("train_images", "training images"),
                       ("val_images", "validation images")):
        if d.get(key) is not None:
            out.append(f"| {label} | `{d[key]}` |")
    out += ["", "### Provenance", ""]
    out.append(f"- MLflow run: {_link(facts.run_id, facts.run_url)}")
    out.append(f"- Prefect flow run: {_link(facts.flow_run_id, facts.flow_run_url)}")
    uri = f"models:/{facts.model_id}" if facts.model_id else f"models:/{facts.name}/VERSION"
    out += ["", "### How to use it", "",
            f"`{uri}` is this model, as is `models:/{facts.name}/VERSION` with this page's "
            f"version number; `models:/{facts.name}@champion` is whichever holds the alias.",
            "Load it anywhere with mlflow, torch and numpy installed (the logged model "
            "carries its own code):", "", "```python", "import mlflow, numpy as np",
            f'model = mlflow.pyfunc.load_model("{uri}")',
            "probabilities = model.predict(np.zeros((1, 32, 32, 3), np.uint8))  # (1, 10)",
            "```", "", "Serve it over HTTP and ask it:", "", "```bash",
            f'mlflow models serve -m "{uri}" --env-manager local -h 127.0.0.1 -p 5001',
            "curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\",
            "  -d '{\"inputs\": [[[[0, 0, 0], ...32 pixels...], ...32 rows...]]}'",
            "```", "", "Or classify image files: `cifar-pipeline predict photo.jpg "
            f"--model-uri {uri}`."]
    return "\n".join(out) + "\n"


def prefect_flow_run() -> tuple[str | None, str | None]:
    """(id, UI URL) of the Prefect flow run this code runs in; (None, None) outside one.
    The URL only where a Prefect server is known (PREFECT_UI_URL or PREFECT_API_URL): an
    ephemeral API's pages are gone when its process ends."""
    from prefect.runtime import flow_run
    from prefect.settings import get_current_settings

    run_id = flow_run.id
    if not run_id:
        return None, None
    ui = get_current_settings().ui_url
    return str(run_id), (f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if ui else None)


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """An absolute link on a tracking server; a link within the UI otherwise (the card is
    read in the UI, whose pages are addressed after the `#`)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else ""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def device_name(network: torch.nn.Module) -> str:
    """The GPU's name, or the CPU's, where the network's weights are."""
    try:
        device = next(network.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _link(text: str | None, url: str | None) -> str:
    if not text:
        return "not recorded"
    return f"[`{text}`]({url})" if url else f"`{text}`"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.2f} h"
