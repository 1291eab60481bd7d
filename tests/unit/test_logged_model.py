"""The logged model stands alone: it carries a copy of the inference code under a name of
its own, loads and predicts where this project cannot be imported, never imports a user's
`model` module, names what is wrong with bad input, and carries its model card."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from model.nets import build_model, count_parameters
from model.predict import predict
from tasks import model_card, registry
from tasks.inference_code import PACKAGE, InferenceCodeError, write_package
from tasks.settings import Settings

REPO = Path(__file__).resolve().parents[2]
FLOW_RUN_ID = "0b8d0e4c-8a54-4f4f-9a53-2a7e3c1c6a11"
METRICS = {"val/acc": 0.8125, "val/acc_tta": 0.8275, "epochs": 3.0, "train_seconds": 75.5}
CONFIG = {"recipe": "fast", "epochs": 3, "batch_size": 512, "lr": 0.2, "tta": True,
          "compile_mode": "default"}


class _Split:
    def __init__(self, n: int, digest: str):
        self.n, self.digest = n, digest

    def __len__(self) -> int:
        return self.n


DATA = SimpleNamespace(source="/data/train.parquet", digest="d" * 64,
                       train=_Split(45_000, "c" * 64), val=_Split(5_000, "e" * 64))


def _import_copy(package: Path) -> str:
    """Import the copied package the way the pyfunc file does."""
    name = f"_test_inference_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return name


def test_the_copy_holds_the_prediction_path_with_relative_imports_only(tmp_path):
    package = write_package(tmp_path)
    assert package.name == PACKAGE
    files = {p.stem for p in package.glob("*.py")}
    assert {"__init__", "nets", "checkpoint", "predict", "augment"} <= files
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("model"), (path.name, node.module)
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("model") for a in node.names), path.name
    name = _import_copy(package)
    nets = importlib.import_module(f"{name}.nets")
    copied = nets.build_model("light")
    assert count_parameters(copied) == count_parameters(build_model("light"))
    assert type(copied).__module__ == f"{name}.nets"


def test_a_module_level_import_outside_the_requirements_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "nets.py").write_text("def later():\n    import torchvision\n")  # lazy: allowed
    (src / "checkpoint.py").write_text("import hashlib\nimport torch\n")
    (src / "predict.py").write_text("import numpy as np\nfrom model.nets import later\n"
                                    "import pandas\n")
    with pytest.raises(InferenceCodeError, match=r"predict.py:3 imports 'pandas'"):
        write_package(tmp_path / "out", model_dir=src)


def test_a_plain_import_of_the_model_package_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("nets", "checkpoint"):
        (src / f"{name}.py").write_text("")
    (src / "predict.py").write_text("import model.nets\n")
    with pytest.raises(InferenceCodeError, match="cannot be made relative"):
        write_package(tmp_path / "out", model_dir=src)


# ------------------------------------------------------------- a registered version

@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One light version with a card, registered inside a (pretend) Prefect flow run."""
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    network = build_model("light").eval()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "CIFAR_ARTIFACT_ROOT"):
            mp.delenv(name, raising=False)
        mp.setenv("PREFECT__FLOW_RUN_ID", FLOW_RUN_ID)
        mp.chdir(tmp)
        settings = Settings.from_env(tmp / "state")
        settings.apply()
        try:
            with temporary_settings(updates={PREFECT_UI_URL: "http://prefect.test:4200"}), \
                    mlflow.start_run() as run:
                mv = registry.register(network, variant="light", tags={"val_acc": "0.8125"},
                                       tta=False, metrics=METRICS, config=CONFIG, data=DATA)
            mp.delenv("PREFECT__FLOW_RUN_ID")
            yield SimpleNamespace(mv=mv, run_id=run.info.run_id, network=network,
                                  tracking_uri=settings.tracking_uri, tmp=tmp)
        finally:
            mlflow.set_tracking_uri(None)


def _isolated_python(script: str, cwd: Path, tracking_uri: str) -> subprocess.CompletedProcess:
    """`python -S -c script` with site-packages on sys.path but none of its .pth files run:
    the project's editable install (a .pth hook) is absent, as in a fresh environment."""
    bootstrap = f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.run([sys.executable, "-S", "-c", bootstrap + script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


PROBE = """
import importlib.util, json
import numpy as np
import mlflow
assert importlib.util.find_spec("tasks") is None and importlib.util.find_spec("flows") is None
model = mlflow.pyfunc.load_model({uri!r})
images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
print("RESULT", json.dumps(model.predict(images).tolist()))
"""


def _hostile(sentinel: Path) -> str:
    return (f"open({str(sentinel)!r}, 'w').write('imported')\n"
            "raise RuntimeError('a user module named model was imported')\n")


@pytest.mark.slow
def test_loads_and_predicts_where_the_project_cannot_be_imported(registered, tmp_path):
    sentinel = tmp_path / "user-model-was-imported"
    # A user's own model.py in the working directory, which is sys.path[0] with `-c`.
    (tmp_path / "model.py").write_text(_hostile(sentinel))
    uri = f"models:/cifar10-resnet/{registered.mv.version}"
    out = _isolated_python(PROBE.format(uri=uri), tmp_path, registered.tracking_uri)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not sentinel.exists()
    probabilities = np.array(json.loads(out.stdout.split("RESULT ", 1)[1]))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    _, expected = predict(registered.network, images)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


@pytest.mark.slow
def test_a_model_package_in_the_working_directory_is_never_imported(registered, tmp_path):
    """With the project installed too: the logged code is found by path, not by name."""
    sentinel = tmp_path / "user-model-was-imported"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text(_hostile(sentinel))
    script = ("import mlflow, numpy as np\n"
              f"m = mlflow.pyfunc.load_model('models:/cifar10-resnet/{registered.mv.version}')\n"
              "print(m.predict(np.zeros((1, 32, 32, 3), np.uint8)).shape)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.tracking_uri}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(1, 10)" in out.stdout and not sentinel.exists()


@pytest.fixture(scope="module")
def loaded(registered):
    return mlflow.pyfunc.load_model(f"models:/cifar10-resnet/{registered.mv.version}")


@pytest.mark.slow
@pytest.mark.parametrize(("images", "message"), [
    (np.zeros((0, 32, 32, 3), np.uint8), "the batch is empty"),
    (np.zeros((2, 3, 32, 32), np.uint8), r"shape \(N, 32, 32, 3\), got shape \(2, 3, 32, 32\)"),
    (np.full((1, 32, 32, 3), 0.5), "got dtype float64"),
    (np.full((1, 32, 32, 3), 256, np.int64), "pixel values must be 0..255, got values from "
     "256 to 256"),
    (np.full((1, 32, 32, 3), -1, np.int16), "got values from -1 to -1"),
    ([[1, 2], [3]], "not an array of images"),
])
def test_bad_input_is_an_invalid_parameter_naming_the_problem(loaded, images, message):
    with pytest.raises(MlflowException, match=message) as caught:
        loaded.predict(images)
    assert caught.value.get_http_status_code() == 400


@pytest.mark.slow
def test_in_range_integers_of_any_width_predict_like_uint8(loaded):
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(loaded.predict(images.astype(np.int64)),
                                  loaded.predict(images))


@pytest.mark.slow
def test_two_loads_in_one_process_run_their_own_copy(registered, loaded):
    again = mlflow.pyfunc.load_model(f"models:/cifar10-resnet/{registered.mv.version}")
    first = type(loaded.unwrap_python_model().network).__module__
    second = type(again.unwrap_python_model().network).__module__
    assert first != second and PACKAGE in first and "model.nets" not in (first, second)


@pytest.mark.slow
def test_the_version_carries_its_model_card(registered):
    client = mlflow.MlflowClient()
    mv = client.get_model_version("cifar10-resnet", registered.mv.version)
    card = mv.description
    params = f"{count_parameters(registered.network):,}"
    for expected in ("`light` ModifiedResNet, recipe `fast`", params, "| validation | 81.25% |",
                     "| validation, flip TTA | 82.75% |", "| epochs | 3 |", "75.5 s",
                     "| lr | `0.2` |", "| batch_size | `512` |", "d" * 64, "e" * 64,
                     "/data/train.parquet", "| training images | `45000` |",
                     mv.tags["weights_sha256"], "mlflow models serve",
                     f"#/experiments/{mlflow.get_run(registered.run_id).info.experiment_id}"
                     f"/runs/{registered.run_id}",
                     f"[`{FLOW_RUN_ID}`](http://prefect.test:4200/runs/flow-run/{FLOW_RUN_ID})",
                     f"models:/{mv.source.rsplit('/', 1)[-1]}"):
        assert expected in card, expected
    assert "compile_mode" not in card  # a speed setting, not part of the recipe
    assert "Validation accuracy chooses the `champion`" in card
    assert "chosen on validation accuracy" in model_card.MODEL_DESCRIPTION
    # The logged model's environment pins what the weights were saved with.
    requirements = Path(mlflow.pyfunc.get_model_dependencies(mv.source)).read_text().split()
    assert f"numpy=={np.__version__}" in requirements
    assert client.get_registered_model("cifar10-resnet").description == \
        model_card.MODEL_DESCRIPTION
    # The Prefect flow run is a tag on the version and on the run.
    assert mv.tags[model_card.FLOW_RUN_TAG] == FLOW_RUN_ID
    assert mv.tags[model_card.FLOW_RUN_URL_TAG].endswith(f"/runs/flow-run/{FLOW_RUN_ID}")
    assert mlflow.get_run(registered.run_id).data.tags[model_card.FLOW_RUN_TAG] == FLOW_RUN_ID
    # The final metrics are on the logged model, so its MLflow page shows its accuracy.
    logged = client.get_logged_model(mv.source.rsplit("/", 1)[-1])
    assert {m.key: m.value for m in logged.metrics}["final/val/acc"] == METRICS["val/acc"]
    assert logged.params["recipe"] == "fast"


def test_a_card_without_a_flow_run_or_metrics_says_so():
    facts = model_card.CardFacts(name="cifar10-resnet", variant="deep", tta=True,
                                 params=4_697_162, weights_bytes=18_800_000,
                                 weights_sha256="f" * 64, device="CPU", git_commit="abc")
    card = model_card.version_description(facts)
    assert "| validation | not recorded |" in card
    assert "Prefect flow run: not recorded" in card and "MLflow run: not recorded" in card
    assert "4,697,162 (17.92 MB fp32)" in card and "flip TTA" in card
