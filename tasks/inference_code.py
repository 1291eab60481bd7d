"""The inference code a logged model carries: a copy of the modules of model/ that build
the network, load its weights and predict, so a registered model loads where this project
is not installed.

The copies form the package `cifar10_resnet_inference`, their `model.*` imports made
relative, so neither sys.path nor a user's own `model/` can stand in. Their module-level
imports must be the standard library, torch or numpy: the logged model's requirements.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "cifar10_resnet_inference"
# What inference needs: the network, weight loading with its checksum, and prediction.
ROOTS = ("nets", "checkpoint", "predict")
SOURCE_PACKAGE = "model"
ALLOWED_THIRD_PARTY = frozenset({"torch", "numpy"})
MODEL_DIR = Path(__file__).resolve().parents[1] / SOURCE_PACKAGE


class InferenceCodeError(RuntimeError):
    """A module of model/ that prediction needs cannot be shipped with a logged model."""


def write_package(dest: str | Path, model_dir: Path = MODEL_DIR) -> Path:
    """Copy the modules that `ROOTS` import, transitively, into `dest/PACKAGE/`; return
    that directory."""
    package = Path(dest) / PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f'"""Inference code of a cifar10-resnet model, copied from {SOURCE_PACKAGE}/ when the '
        'model was logged."""\n')
    pending, done = list(ROOTS), set()
    while pending:
        name = pending.pop()
        if name in done:
            continue
        done.add(name)
        path = model_dir / f"{name}.py"
        if not path.is_file():
            raise InferenceCodeError(f"{path} is missing: it is needed for inference")
        source, deps = _rewrite(path.read_text(), path)
        (package / path.name).write_text(source)
        pending.extend(deps)
    return package


def _rewrite(source: str, path: Path) -> tuple[str, list[str]]:
    """`source` with `from model.X import` made relative, and the sibling modules it needs."""
    tree = ast.parse(source, filename=str(path))
    lines = source.splitlines(keepends=True)
    deps: list[str] = []
    module_level = {id(node) for node in _module_level_statements(tree.body)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.partition(".")[0]
                if top == SOURCE_PACKAGE:
                    raise InferenceCodeError(
                        f"{path.name}:{node.lineno}: `import {alias.name}` cannot be made "
                        f"relative; write `from {SOURCE_PACKAGE}.X import name`")
                if id(node) in module_level:
                    _check_dependency(top, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # already relative: a sibling module
                deps.extend(_siblings(node))
                continue
            top = (node.module or "").partition(".")[0]
            if top != SOURCE_PACKAGE:
                if id(node) in module_level:
                    _check_dependency(top, path, node.lineno)
                continue
            deps.extend(_siblings(node))
            index = node.lineno - 1
            line = lines[index]
            head, tail = line[: node.col_offset], line[node.col_offset:]
            prefix = f"from {node.module} "
            if not tail.startswith(prefix):
                raise InferenceCodeError(f"{path.name}:{node.lineno}: cannot rewrite {line!r}")
            relative = "." + node.module[len(SOURCE_PACKAGE) + 1:]
            lines[index] = f"{head}from {relative} {tail[len(prefix):]}"
    return "".join(lines), deps


def _siblings(node: ast.ImportFrom) -> list[str]:
    """The model/ modules an import names: `from model.x import` or `from . import x`."""
    module = node.module or ""
    if node.level == 0:
        module = module[len(SOURCE_PACKAGE) + 1:]
    if module:
        return [module.partition(".")[0]]
    return [alias.name for alias in node.names]


def _module_level_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import: the body, including inside `if` and `try` blocks, not
    inside functions or classes (a lazy import there runs only if that code runs)."""
    out = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If | ast.Try):
            for block in (node.body, node.orelse, getattr(node, "finalbody", []),
                          *(h.body for h in getattr(node, "handlers", []))):
                out.extend(_module_level_statements(block))
    return out


def _check_dependency(top: str, path: Path, lineno: int) -> None:
    if top in ("", "__future__") or top in sys.stdlib_module_names:
        return
    if top not in ALLOWED_THIRD_PARTY:
        raise InferenceCodeError(
            f"{path.name}:{lineno} imports {top!r} at module level, which a logged model "
            f"does not require (only {sorted(ALLOWED_THIRD_PARTY)}): import it inside the "
            "function that needs it, or keep that code out of the prediction path")
