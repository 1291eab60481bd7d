"""model/ must run alone on a GPU machine that has only torch, torchvision, numpy, pyarrow
and Pillow."""

import ast
import subprocess
import sys
from pathlib import Path

MODEL = Path(__file__).resolve().parents[2] / "model"
FORBIDDEN = {"prefect", "mlflow", "boto3", "botocore", "tasks", "flows"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_model_file_imports_the_orchestration_stack():
    files = sorted(MODEL.glob("*.py"))
    assert len(files) >= 8
    offenders = {f.name: _imports(f) & FORBIDDEN for f in files if _imports(f) & FORBIDDEN}
    assert offenders == {}


def test_importing_model_loads_none_of_them():
    code = (
        "import sys, model.nets, model.data, model.augment, model.train, model.predict, "
        "model.checkpoint, model.bench, model.profiles\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=MODEL.parent)
    assert result.returncode == 0, result.stdout + result.stderr
