"""model/ must run alone on a GPU machine that has only torch, torchvision, numpy, pyarrow
and Pillow.

The check is an allow-list: the benchmark's smoke run goes through an import guard that
lets in the standard library, those five packages, whatever they import themselves, and
`model`, and refuses any other third-party package with ImportError. A package installed
here for the flows (pydantic, prefect, mlflow, boto3) is as absent there as one never heard
of, so naming the forbidden ones would miss the next.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_MACHINE_PACKAGES = ("torch", "torchvision", "numpy", "pyarrow", "PIL")

# Run as `python -c GUARD MODULE ARGS...`: installs the guard, then runs MODULE as __main__.
# An import is judged by its name, else by its importer: the first frame up the stack that
# is neither the import machinery nor the standard library (importlib.import_module called
# from model/ is model's import). A package an allowed one imports is allowed in turn, so
# torch's own dependencies (sympy, filelock, jinja2, ...) load; `model` confers nothing.
GUARD = textwrap.dedent("""
    import builtins, functools, importlib.machinery, os, runpy, sys, sysconfig

    ALLOWED = set(sys.argv[1].split(","))
    module = sys.argv[2]  # what runs: model.bench, or a test's probe
    NAMED = ALLOWED | {"model", "__main__", module}
    # The standard library by name, or by place (_sysconfigdata_<platform>, for one).
    STDLIB_DIRS = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"),
                   os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload")]
    deps = set(ALLOWED)  # grows with what allowed packages import
    GUARD = globals()  # this code's own frames are machinery too

    def top(name):
        return (name or "").partition(".")[0]

    @functools.cache
    def stdlib(name):
        return name in sys.stdlib_module_names or (
            name != "" and importlib.machinery.PathFinder.find_spec(name, STDLIB_DIRS)
            is not None)

    def importer_of(frame):
        while frame is not None:
            name = top(frame.f_globals.get("__name__"))
            machinery = frame.f_globals is GUARD or frame.f_code.co_filename.startswith(
                "<frozen") or stdlib(name)
            if not machinery:
                return name
            frame = frame.f_back
        return ""

    def check(name, importer):
        if top(name) in NAMED or stdlib(top(name)):
            return
        if top(importer) in deps:
            deps.add(top(name))
            return
        raise ModuleNotFoundError(
            f"import guard: {name!r} (imported by {importer!r}) is not available on the "
            f"GPU machine", name=name)

    class Guard:
        @staticmethod
        def find_spec(name, path=None, target=None):
            check(name, importer_of(sys._getframe(1)))
            return None  # allowed: the next finder loads it

    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        # Also judges names already in sys.modules, which never reach a finder.
        if level == 0:
            check(name, (globals or {}).get("__name__", ""))
        return real_import(name, globals, locals, fromlist, level)

    sys.meta_path.insert(0, Guard)
    builtins.__import__ = guarded_import
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
""")


def run_guarded(module: str, *args: str, cwd: Path = ROOT, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-c", GUARD, ",".join(GPU_MACHINE_PACKAGES), module, *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=600,
    )


def _static_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_every_model_file_names_only_the_allowed_packages():
    # Also catches imports inside functions that the smoke run never reaches.
    allowed = set(GPU_MACHINE_PACKAGES) | set(sys.stdlib_module_names) | {"model"}
    files = sorted((ROOT / "model").rglob("*.py"))
    assert ROOT / "model" / "data" / "parquet.py" in files  # subpackages too
    offenders = {str(f.relative_to(ROOT)): sorted(_static_imports(f) - allowed) for f in files}
    assert {name: bad for name, bad in offenders.items() if bad} == {}


@pytest.mark.slow
def test_the_benchmark_smoke_run_needs_nothing_but_the_gpu_machine_packages(tmp_path):
    out = tmp_path / "smoke.json"
    result = run_guarded("model.bench", "--smoke", "--variants", "light", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "import guard" not in result.stderr
    assert json.loads(out.read_text())["rows"]


def _probe(tmp_path: Path, name: str, code: str) -> dict:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def test_the_guard_refuses_a_package_outside_the_list(tmp_path):
    # pydantic is installed here (the flows use it), so only the guard can refuse it.
    env = _probe(tmp_path, "probe", """
        import importlib, json
        import numpy
        importlib.import_module("pydantic")
    """)
    result = run_guarded("probe", env=env)
    assert result.returncode != 0
    assert "import guard: 'pydantic' (imported by '__main__')" in result.stderr


@pytest.mark.slow
def test_the_guard_lets_torch_load_its_own_dependencies_and_only_torch(tmp_path):
    env = _probe(tmp_path, "torch_deps", """
        import sys
        import torch.fx.experimental.symbolic_shapes  # imports sympy itself
        assert "sympy" in sys.modules
        try:
            import sympy  # loaded already, yet not this module's to import
        except ImportError as exc:
            print("refused:", exc)
    """)
    result = run_guarded("torch_deps", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: import guard: 'sympy' (imported by '__main__')" in result.stdout
