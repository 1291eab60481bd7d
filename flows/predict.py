"""`cifar-pipeline predict`: classify image files, folders of them, or a competition pickle
with a registered model. Every input is read before the model is loaded, so a typo costs
no download; an unreadable file is reported and skipped, and the exit status says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.images import ImageFileError, load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PICKLE_SUFFIXES = (".pkl", ".pickle")


@dataclass
class Inputs:
    names: list[str] = field(default_factory=list)  # a file, or `file.pkl#id`
    images: list[np.ndarray] = field(default_factory=list)  # (32, 32, 3) uint8 each
    failures: list[tuple[str, str]] = field(default_factory=list)  # (name, why)

    def add(self, name: str, images: np.ndarray) -> None:
        self.names.append(name)
        self.images.append(images)

    def array(self) -> np.ndarray:
        if not self.images:
            return np.empty((0, 32, 32, 3), np.uint8)
        return np.stack(self.images)  # (N, 32, 32, 3)


def read_inputs(paths: Iterable[str]) -> Inputs:
    """Image files, folders (their *.png, *.jpg and *.jpeg, not recursively) and
    competition pickles (*.pkl, or an s3:// or file:// URI) as 32x32 images."""
    out = Inputs()
    for given in paths:
        if "://" in given or given.lower().endswith(PICKLE_SUFFIXES):
            _read_pickle(given, out)
            continue
        path = Path(given)
        if path.is_dir():
            # Every entry named like an image: one that is not a regular file is reported.
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                out.failures.append((given, "no *.png, *.jpg or *.jpeg files in this folder"))
            for file in files:
                _read_image(file, str(file), out)
        elif not path.exists():
            out.failures.append((given, "no such file or folder"))
        else:
            _read_image(path, given, out)
    return out


def _read_image(path: Path, name: str, out: Inputs) -> None:
    try:
        out.add(name, load_image(path))
    except ImageFileError as exc:
        out.failures.append((name, str(exc)))


def _read_pickle(given: str, out: Inputs) -> None:
    from model.data import InvalidInputError, read_competition_pickle
    from model.data.uri import redact

    try:
        ids, images = read_competition_pickle(given)
    except (InvalidInputError, OSError) as exc:
        out.failures.append((redact(given), str(exc)))
        return
    for i, image in zip(ids.tolist(), images, strict=True):
        out.add(f"{given}#{i}", image)


def classify(inputs: Inputs, model_uri: str, *, tta: bool, device: str) -> dict:
    """Predictions for `inputs` with the registered model at `model_uri`, as the JSON
    document `--json` prints."""
    from model.data import CLASSES
    from model.predict import resolve_device
    from tasks import registry
    from tasks.progress import predict_with_bar
    from tasks.settings import Settings

    Settings.from_env().apply()  # the tracking store of --state-dir or the environment
    resolved = resolve_device(device)
    loaded = registry.load(model_uri, device=resolved)
    labels, probabilities = predict_with_bar(loaded.network, inputs.array(), "predicting",
                                             tta=tta, device=resolved)
    rows = [{"file": name, "class": CLASSES[label], "label": int(label),
             "confidence": float(p[label]),
             "probabilities": {c: round(float(v), 6) for c, v in zip(CLASSES, p, strict=True)}}
            for name, label, p in zip(inputs.names, labels.tolist(), probabilities, strict=True)]
    return {"model": {"uri": model_uri, "name": loaded.name, "version": loaded.version,
                      "run_id": loaded.run_id, "variant": loaded.variant, "tta": tta},
            "predictions": rows,
            "failed": [{"file": name, "error": why} for name, why in inputs.failures]}


def table(result: dict) -> str:
    """file, class and confidence, one line per image, under the model it came from."""
    model = result["model"]
    rows = [(printable(r["file"]), r["class"], f"{100 * r['confidence']:.1f}%")
            for r in result["predictions"]]
    width = max([len("file"), *(len(r[0]) for r in rows)])
    lines = [f"{model['name']} version {model['version']} ({model['variant']}), "
             f"{'with' if model['tta'] else 'without'} flip TTA",
             f"{'file':<{width}}  {'class':<10}  {'confidence':>10}"]
    lines += [f"{name:<{width}}  {cls:<10}  {conf:>10}" for name, cls, conf in rows]
    return "\n".join(lines)


def printable(text: str) -> str:
    """`text` on one line: a newline or other control character in a file's name is shown
    escaped, so it can neither break a row of the table nor forge one."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run(paths: Sequence[str], model_uri: str, *, tta: bool, device: str, as_json: bool,
        out, err) -> int:
    """The predict command: 0 when every input was classified, 1 when any failed."""
    inputs = read_inputs(paths)
    for name, why in inputs.failures:
        print(printable(f"error: {name}: {why}"), file=err)
    if not inputs.names:
        print(f"error: none of the {len(paths)} input(s) could be read; nothing to classify",
              file=err)
        return 1
    from tasks.progress import terminal_bars

    with terminal_bars():  # on stderr, a terminal only: --json and pipes see none
        result = classify(inputs, model_uri, tta=tta, device=device)
    print(json.dumps(result, indent=2) if as_json else table(result), file=out)
    if inputs.failures:
        print(f"error: {len(inputs.failures)} input(s) failed, {len(inputs.names)} image(s) "
              "classified", file=err)
        return 1
    return 0
