"""The Kubernetes material of infra/: the GPU work pool's base job template, the manifests
of infra/k8s and the worker image's Dockerfile.

The template is rendered the way Prefect's Kubernetes worker renders it, with Prefect's own
`BaseJobConfiguration.from_template_and_values` (variable defaults, then `apply_values`),
against a real `prefect server` that has just accepted it through
`prefect work-pool create --type kubernetes --base-job-template`. prefect-kubernetes is not
a dependency of this project: the server knows the `kubernetes` pool type from the worker
metadata that ships with Prefect, and the two things of prefect-kubernetes these tests rely
on (its job configuration's fields, its required Job shape) are restated below.

No Kubernetes cluster and no Docker engine are needed: manifests and Dockerfile are
checked structurally.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import WorkPool
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.base import BaseJobConfiguration

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
TEMPLATE_PATH = K8S / "base-job-template.json"
DOCKERFILE = REPO / "infra" / "Dockerfile"
POOL = "k8s-gpu"
PREFECT = Path(sys.executable).with_name("prefect")
SERVER_TIMEOUT = 90  # seconds; a fresh SQLite database is migrated first (~30 s on 2 CPUs)

SAMPLE_VALUES: dict[str, Any] = {
    "image": "registry.example.com/cifar-pipeline:0.1.0",
    "gpu_count": 2,
    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}
    ],
    "env_from_secrets": [
        {"secretRef": {"name": "mlflow-credentials"}},
        {"secretRef": {"name": "s3-credentials"}},
    ],
}

# prefect-kubernetes' `_get_base_job_manifest()`: its worker refuses a Job that lacks any
# of this (KubernetesWorkerJobConfiguration._validate_job_manifest).
REQUIRED_JOB_SHAPE = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "spec": {
        "template": {
            "spec": {
                "parallelism": 1,
                "completions": 1,
                "restartPolicy": "Never",
                "containers": [{"name": "prefect-job"}],
            }
        }
    },
}


class K8sJobConfiguration(BaseJobConfiguration):
    """The fields of prefect-kubernetes' KubernetesWorkerJobConfiguration that the template
    fills, less the worker's own post-processing (labels, env list, generated name)."""

    namespace: str = "default"
    job_manifest: dict[str, Any]
    job_watch_timeout_seconds: int | None = None
    pod_watch_timeout_seconds: int = 60
    stream_output: bool = True


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """This environment without inherited Prefect settings, plus a private PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _template() -> dict[str, Any]:
    return json.loads(TEMPLATE_PATH.read_text())


def _render(
    api_url: str, template: dict[str, Any], values: dict[str, Any]
) -> K8sJobConfiguration:
    """The job configuration a Kubernetes worker builds for a flow run with these job
    variables (block and variable references would be resolved through this API)."""

    async def render() -> K8sJobConfiguration:
        async with get_client() as client:
            return await K8sJobConfiguration.from_template_and_values(
                template, values, client=client
            )

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(render())


def _pod_spec(config: K8sJobConfiguration) -> dict[str, Any]:
    return config.job_manifest["spec"]["template"]["spec"]


def _assert_contains(actual: Any, required: Any, path: str = "") -> None:
    """Every key and list item of `required` is in `actual` with the same value."""
    if isinstance(required, dict):
        assert isinstance(actual, dict), f"{path or '/'} is not an object: {actual!r}"
        for key, value in required.items():
            assert key in actual, f"{path}/{key} is missing"
            _assert_contains(actual[key], value, f"{path}/{key}")
    elif isinstance(required, list):
        assert isinstance(actual, list) and len(actual) >= len(required), path
        for i, value in enumerate(required):
            _assert_contains(actual[i], value, f"{path}/{i}")
    else:
        assert actual == required, f"{path}: {actual!r} != {required!r}"


def _no_placeholders(obj: Any) -> bool:
    return "{{" not in json.dumps(obj)


@functools.cache
def _parsed() -> dict[str, list[dict[str, Any]]]:
    docs = {}
    for path in sorted(K8S.glob("*.y*ml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _docs() -> dict[str, list[dict[str, Any]]]:
    """Every YAML document under infra/k8s, by file name (a fresh copy each call)."""
    return copy.deepcopy(_parsed())


def _objects(kind: str | None = None) -> list[dict[str, Any]]:
    return [
        d for name, ds in _docs().items() if name != "kustomization.yaml" for d in ds
        if kind is None or d["kind"] == kind
    ]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _objects(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} under infra/k8s, found {len(found)}"
    return found[0]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _walk(obj: Any):
    """Every dict inside obj, depth first."""
    if isinstance(obj, dict):
        yield obj
        for value in obj.values():
            yield from _walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk(value)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def prefect_api(spawn, prefect_home: Path) -> str:
    """A `prefect server` on 127.0.0.1 (its own SQLite database under a temporary
    PREFECT_HOME), for this module; the API only, no UI or background services."""
    port = _free_port()
    cmd = [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--no-ui", "--no-services"]
    spawn("prefect-server", cmd, f"http://127.0.0.1:{port}/api/health",
          env=_prefect_env(prefect_home), timeout=SERVER_TIMEOUT)
    return f"http://127.0.0.1:{port}/api"


@pytest.fixture(scope="module")
def created_pool(prefect_api: str, prefect_home: Path) -> WorkPool:
    """The k8s-gpu pool, created by the CLI from infra/k8s/base-job-template.json, as the
    server returns it."""
    cmd = [str(PREFECT), "work-pool", "create", POOL, "--type", "kubernetes",
           "--base-job-template", str(TEMPLATE_PATH)]
    proc = subprocess.run(cmd, env=_prefect_env(prefect_home, prefect_api), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert f"Created work pool {POOL!r}" in proc.stdout

    async def read() -> WorkPool:
        async with get_client() as client:
            return await client.read_work_pool(POOL)

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        return asyncio.run(read())


# ------------------------------------------------------------------ the job template


def test_server_accepts_template_through_the_cli(created_pool: WorkPool) -> None:
    assert created_pool.type == "kubernetes"
    assert created_pool.base_job_template == _template()
    gpu = created_pool.base_job_template["variables"]["properties"]["gpu_count"]
    assert (gpu["type"], gpu["default"], gpu["minimum"]) == ("integer", 1, 0)


def test_server_rejects_a_template_with_an_undeclared_variable(prefect_api: str) -> None:
    # The check the accepted template passed: every placeholder is a declared variable.
    broken = _template()
    broken["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = (
        "{{ deadline }}"
    )
    response = httpx.post(
        f"{prefect_api}/work_pools/",
        json={"name": "k8s-broken", "type": "kubernetes", "base_job_template": broken},
        timeout=30,
    )
    assert response.status_code == 422, response.text
    assert "deadline" in response.text


def test_sample_values_render_into_the_job_manifest(prefect_api: str) -> None:
    config = _render(prefect_api, _template(), SAMPLE_VALUES)
    pod = _pod_spec(config)
    (container,) = pod["containers"]

    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 2 and isinstance(gpus, int)  # the whole-value placeholder keeps its type
    assert pod["tolerations"] == SAMPLE_VALUES["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert container["envFrom"] == [
        {"secretRef": {"name": "mlflow-credentials"}},
        {"secretRef": {"name": "s3-credentials"}},
    ]
    assert container["image"] == "registry.example.com/cifar-pipeline:0.1.0"
    # What the sample did not set keeps the template's defaults.
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "16Gi"}
    assert config.namespace == config.job_manifest["metadata"]["namespace"] == "cifar-pipeline"
    assert _no_placeholders(config.job_manifest)


def test_defaults_render_without_values(prefect_api: str) -> None:
    template = _template()
    config = _render(prefect_api, template, {})
    pod = _pod_spec(config)
    (container,) = pod["containers"]
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}

    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 1 and isinstance(gpus, int)
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["nodeSelector"] == {}
    assert container["image"] == defaults["image"] == "ghcr.io/example/cifar-pipeline:latest"
    assert container["envFrom"] == defaults["env_from_secrets"]
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert config.job_manifest["spec"]["ttlSecondsAfterFinished"] == 86400
    assert config.pod_watch_timeout_seconds == defaults["pod_watch_timeout_seconds"]
    assert config.env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # /dev/shm for DataLoader workers.
    (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    # Variables without a default are dropped, not rendered as empty strings.
    assert "serviceAccountName" not in pod
    assert "cpu" not in container["resources"]["limits"]
    assert _no_placeholders(config.job_manifest)


def test_deployment_env_merges_over_the_template_env(prefect_api: str) -> None:
    config = _render(prefect_api, _template(), {"env": {"CIFAR10_SOURCE": "s3://b/train.pq"}})
    assert config.env["CIFAR10_SOURCE"] == "s3://b/train.pq"
    assert config.env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_gpu_count_zero_renders_a_zero_limit(prefect_api: str) -> None:
    config = _render(prefect_api, _template(), {"gpu_count": 0})
    assert _pod_spec(config)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0


def test_rendered_job_has_the_shape_the_kubernetes_worker_requires(
    prefect_api: str, created_pool: WorkPool
) -> None:
    # Rendered from the template as stored by the server, as a worker would.
    config = _render(prefect_api, created_pool.base_job_template, SAMPLE_VALUES)
    _assert_contains(config.job_manifest, REQUIRED_JOB_SHAPE)

    # Everything the default kubernetes template configures, this one does too, except the
    # cluster_config block: the worker runs in the cluster and uses its service account.
    metadata = httpx.get(
        f"{prefect_api}/collections/views/aggregate-worker-metadata", timeout=30
    ).json()
    default = metadata["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    ours = created_pool.base_job_template["job_configuration"]
    assert set(default["job_configuration"]) - {"cluster_config"} <= set(ours)
    declared = set(created_pool.base_job_template["variables"]["properties"])
    assert set(default["variables"]["properties"]) - {"cluster_config"} <= declared


def test_init_container_creates_the_pool_capped_at_the_configured_gpus(
    prefect_api: str, prefect_home: Path, created_pool: WorkPool
) -> None:
    """The worker's init container script, run here as the cluster would run it, on a
    server where the pool does not exist yet (as on a fresh cluster)."""
    worker = _one("Deployment", "prefect-worker")
    (init,) = worker["spec"]["template"]["spec"]["initContainers"]
    (mount,) = [m for m in init["volumeMounts"] if m["name"] == "base-job-template"]
    script = init["args"][-1].replace(f"{mount['mountPath']}/{TEMPLATE_PATH.name}",
                                      str(TEMPLATE_PATH))
    config = _one("ConfigMap", "prefect-worker-config")["data"]
    limit = int(config["GPU_POOL_CONCURRENCY_LIMIT"])
    assert limit >= 1

    deleted = httpx.delete(f"{prefect_api}/work_pools/{POOL}", timeout=30)
    assert deleted.status_code == 204, deleted.text
    env = _prefect_env(prefect_home, prefect_api)
    env.update(PATH=f"{PREFECT.parent}{os.pathsep}{env.get('PATH', '')}",
               GPU_POOL_CONCURRENCY_LIMIT=str(limit))
    proc = subprocess.run(["/bin/sh", "-c", script], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"

    pool = httpx.get(f"{prefect_api}/work_pools/{POOL}", timeout=30).json()
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"] == _template()
    assert pool["concurrency_limit"] == limit


# ------------------------------------------------------------------------ the manifests


def test_every_manifest_parses_and_names_itself() -> None:
    docs = _docs()
    assert {"kustomization.yaml", "prefect-worker.yaml", "mlflow.yaml", "postgres.yaml"} <= set(
        docs
    )
    for name, file_docs in docs.items():
        assert file_docs, f"{name} is empty"
        for doc in file_docs:
            assert doc.get("apiVersion") and doc.get("kind"), f"{name}: {doc}"
            assert doc.get("metadata", {}).get("name"), f"{name}: a {doc['kind']} without name"


def test_kustomization_lists_the_manifests_and_the_template() -> None:
    (kustomization,) = _docs()["kustomization.yaml"]
    resources = kustomization["resources"]
    # Every manifest but the Secrets' example, which must never carry real values into git.
    expected = {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml", "secrets.example.yaml"
    }
    assert set(resources) == expected
    (generated,) = kustomization["configMapGenerator"]
    assert generated["files"] == [TEMPLATE_PATH.name]
    # The template's Jobs go where the worker's Role is.
    template_namespace = _template()["variables"]["properties"]["namespace"]["default"]
    assert kustomization["namespace"] == template_namespace


def test_worker_polls_the_k8s_pool_with_the_mounted_template() -> None:
    (kustomization,) = _docs()["kustomization.yaml"]
    config_map = kustomization["configMapGenerator"][0]["name"]
    worker = _one("Deployment", "prefect-worker")
    pod = worker["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "prefect-worker")
    args = container.get("command", []) + container["args"]

    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--pool") + 1] == POOL
    assert args[args.index("--type") + 1] == "kubernetes"
    template_path = args[args.index("--base-job-template") + 1]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == config_map]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert template_path == f"{mount['mountPath']}/{TEMPLATE_PATH.name}"

    env_from = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    api_urls = [_one("ConfigMap", n)["data"].get("PREFECT_API_URL") for n in env_from]
    assert any(url and url.endswith("/api") for url in api_urls)


def test_worker_may_create_jobs_and_watch_pods_in_its_namespace() -> None:
    worker = _one("Deployment", "prefect-worker")
    account = worker["spec"]["template"]["spec"]["serviceAccountName"]
    _one("ServiceAccount", account)
    bindings = [
        b for b in _objects("RoleBinding")
        if {"kind": "ServiceAccount", "name": account} in b["subjects"]
    ]
    assert bindings, f"no RoleBinding for the ServiceAccount {account!r}"
    granted: set[tuple[str, str, str]] = set()
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"  # namespaced, nothing cluster-wide
        for rule in _one("Role", binding["roleRef"]["name"])["rules"]:
            granted |= {
                (group, resource, verb)
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            }
    needed = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    needed |= {("", "pods", v) for v in ("get", "list", "watch")} | {("", "pods/log", "get")}
    assert needed <= granted, f"missing: {sorted(needed - granted)}"
    assert not _objects("ClusterRoleBinding")


def test_mlflow_uses_postgres_and_s3_artifacts() -> None:
    mlflow = _one("Deployment", "mlflow")
    (container,) = mlflow["spec"]["template"]["spec"]["containers"]
    args = container["command"] + container["args"]
    options = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    assert args[:2] == ["mlflow", "server"]
    assert options["--backend-store-uri"].startswith("postgresql://")
    assert "@postgres:5432/" in options["--backend-store-uri"]
    env = {e["name"]: e for e in container["env"]}
    # $(VAR) references in args must name variables the container defines.
    for ref in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert ref in env, f"mlflow's args use $({ref}), which its env does not define"
    destination = options["--artifacts-destination"]
    if destination.startswith("$("):
        key = env[destination[2:-1]]["valueFrom"]["configMapKeyRef"]
        destination = _one("ConfigMap", key["name"])["data"][key["key"]]
    assert destination.startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True

    _one("Service", "mlflow")
    postgres = _one("StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"], "postgres keeps its data on a PVC"
    assert _one("Service", "postgres")["spec"]["selector"].items() <= (
        postgres["spec"]["template"]["metadata"]["labels"].items()
    )


def test_services_select_their_pods() -> None:
    workloads = _objects("Deployment") + _objects("StatefulSet")
    for service in _objects("Service"):
        selector = service["spec"]["selector"].items()
        assert any(
            selector <= w["spec"]["template"]["metadata"]["labels"].items() for w in workloads
        ), f"Service {service['metadata']['name']} selects no pod"


def test_no_plaintext_secrets() -> None:
    sensitive = re.compile(r"PASSWORD|SECRET|TOKEN|KEY|AUTH", re.IGNORECASE)
    secrets = _objects("Secret")
    assert secrets, "secrets.example.yaml defines the Secrets the manifests use"
    for secret in secrets:
        name = secret["metadata"]["name"]
        assert "data" not in secret, f"{name}: base64 `data` hides what is committed"
        for key, value in secret["stringData"].items():
            if sensitive.search(key):
                assert "CHANGE-ME" in str(value), f"{name}.{key} is not a placeholder"
    # Outside Secrets, nothing that looks like a credential has a literal value.
    for obj in _objects():
        if obj["kind"] == "Secret":
            continue
        for env in _walk(obj):
            if "name" in env and "value" in env and sensitive.search(env["name"]):
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {env['name']} is literal")
        for key in obj.get("data", {}) if obj["kind"] == "ConfigMap" else ():
            assert not sensitive.search(key), f"ConfigMap {obj['metadata']['name']}: {key}"
    template_env = _template()["variables"]["properties"]["env"]["default"]
    assert not [k for k in template_env if sensitive.search(k)]


def test_every_referenced_secret_and_config_map_is_defined() -> None:
    defined = {
        (obj["kind"], obj["metadata"]["name"]) for obj in _objects()
    }
    (kustomization,) = _docs()["kustomization.yaml"]
    defined |= {("ConfigMap", g["name"]) for g in kustomization["configMapGenerator"]}
    template = _template()["variables"]["properties"]
    sources = [*_objects(), template["env_from_secrets"]["default"]]
    refs = set()
    for node in _walk(sources):
        for field, kind in (("secretRef", "Secret"), ("secretKeyRef", "Secret"),
                            ("configMapRef", "ConfigMap"), ("configMapKeyRef", "ConfigMap"),
                            ("configMap", "ConfigMap")):
            if isinstance(node.get(field), dict):
                refs.add((kind, node[field]["name"]))
    assert refs, "no references found: the walk is broken"
    assert refs <= defined, f"undefined: {sorted(refs - defined)}"


def test_kustomize_build_wires_the_template_into_the_worker() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "this test builds infra/k8s with kubectl kustomize: install kubectl"
    proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    (config_map,) = [
        d for d in built
        if d["kind"] == "ConfigMap" and TEMPLATE_PATH.name in d.get("data", {})
    ]
    assert json.loads(config_map["data"][TEMPLATE_PATH.name]) == _template()
    (worker,) = [d for d in built if d["kind"] == "Deployment"
                 and d["metadata"]["name"] == "prefect-worker"]
    volumes = worker["spec"]["template"]["spec"]["volumes"]
    # The generated name carries a content hash; the reference must follow it.
    assert config_map["metadata"]["name"] in [v.get("configMap", {}).get("name") for v in volumes]
    namespaced = [d for d in built if d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"cifar-pipeline"}


# ------------------------------------------------------------------------ the Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines if line and not line.startswith("#")
    ]


def test_dockerfile_builds_a_non_root_cuda_image_of_the_project() -> None:
    instructions = _instructions()
    kind, image = instructions[0]
    assert kind == "FROM" and re.match(r"nvidia/cuda:|pytorch/pytorch:.*cuda", image), image

    runs = " ".join(args for kind, args in instructions if kind == "RUN")
    assert "download.pytorch.org/whl/cu" in " ".join(a for _, a in instructions)
    assert re.search(r"pip install[^&]*\s\.(\s|$)", runs), "the project is not pip-installed"
    # torch.compile on the GPU: Triton builds its launcher with a C compiler and Python.h.
    apt = re.search(r"apt-get install ([^&]*)", runs)
    assert apt and {"gcc", "python3-dev"} <= set(apt.group(1).split()), runs
    # Each run logs its own GPU's utilisation and memory through NVML.
    assert "nvidia-ml-py" in runs

    # The build context is the repository root: every COPY source must exist there.
    for kind, args in instructions:
        if kind == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"

    users = [args for kind, args in instructions if kind == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    # Numeric, so Kubernetes can check runAsNonRoot (the job template asks for it).
    assert uid.isdigit() and int(uid) != 0
    assert any(kind == "WORKDIR" for kind, _ in instructions)

    (cmd,) = [json.loads(args) for kind, args in instructions if kind == "CMD"]
    assert cmd[:3] == ["prefect", "worker", "start"]
    assert cmd[cmd.index("--pool") + 1] == "gpu"
    assert cmd[cmd.index("--type") + 1] == "process"
