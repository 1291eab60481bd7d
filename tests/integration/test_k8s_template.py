"""The Kubernetes material of infra/: the work pools' base job template, the manifests of
infra/k8s, the Kubernetes deployment file (infra/k8s/prefect.yaml), the Helm values of
infra/helm and the worker image's Dockerfile.

The template is rendered the way Prefect's Kubernetes worker renders it, against a real
`prefect server` that has just accepted it through `prefect work-pool create --type
kubernetes --base-job-template`: the first tests with Prefect's
`BaseJobConfiguration.from_template_and_values` and the fields of prefect-kubernetes' job
configuration restated below; the deployment tests with prefect-kubernetes' own
`KubernetesWorkerJobConfiguration` (a dev dependency), through `prepare_for_flow_run`, into
the very Job its worker submits, which `kubernetes-validate` then checks against
Kubernetes' schemas, as it does every manifest.

No Kubernetes cluster, Docker engine, Helm or network is needed: the Dockerfile is checked
structurally, the Helm values against an excerpt of the charts' keys.
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
import uuid
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
DEPLOYMENTS_FILE = K8S / "prefect.yaml"  # Prefect's deployment file, not a manifest
DOCKERFILE = REPO / "infra" / "Dockerfile"
POOL = "k8s-gpu"
CPU_POOL = "k8s-cpu"
IMAGE = "registry.example.com/cifar-pipeline:3f9c2e1a7b4d"
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
    for path in sorted(set(K8S.glob("*.y*ml")) - {DEPLOYMENTS_FILE}):
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


def test_defaults_render_with_only_an_image(prefect_api: str) -> None:
    template = _template()
    config = _render(prefect_api, template, {"image": IMAGE})
    pod = _pod_spec(config)
    (container,) = pod["containers"]
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}

    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 1 and isinstance(gpus, int)
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["nodeSelector"] == {}
    # No default image (a mutable tag would be one): the deployment names an immutable tag.
    assert defaults["image"] is None and template["variables"]["required"] == ["image"]
    assert container["image"] == IMAGE
    # Every secret optional: with a role on the service account there are no static keys.
    assert container["envFrom"] == defaults["env_from_secrets"]
    assert all(ref["secretRef"]["optional"] is True for ref in container["envFrom"])
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

    for pool in (POOL, CPU_POOL):
        deleted = httpx.delete(f"{prefect_api}/work_pools/{pool}", timeout=30)
        assert deleted.status_code in (204, 404), deleted.text
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
    # The parents' pool: same template, no cap (a parent waits on its children).
    cpu = httpx.get(f"{prefect_api}/work_pools/{CPU_POOL}", timeout=30).json()
    assert (cpu["type"], cpu["concurrency_limit"]) == ("kubernetes", None)
    assert cpu["base_job_template"] == _template()


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
        "kustomization.yaml", "secrets.example.yaml", DEPLOYMENTS_FILE.name
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

    # One worker per pool, each with the same template; health ports apart (one network).
    polled = {}
    for worker_container in pod["containers"]:
        worker_args = worker_container["args"]
        polled[worker_args[worker_args.index("--pool") + 1]] = worker_container
        assert worker_args[worker_args.index("--base-job-template") + 1] == template_path
    assert set(polled) == {POOL, CPU_POOL}
    ports = [p["containerPort"] for c in pod["containers"] for p in c["ports"]]
    assert len(ports) == len(set(ports)) == 2
    cpu_env = {e["name"]: e.get("value") for e in polled[CPU_POOL]["env"]}
    assert int(cpu_env["PREFECT_WORKER_WEBSERVER_PORT"]) == polled[CPU_POOL]["ports"][0][
        "containerPort"]


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


def _kustomized() -> list[dict]:
    """Every object `kubectl kustomize infra/k8s` builds."""
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "this test builds infra/k8s with kubectl kustomize: install kubectl"
    proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_kustomize_build_wires_the_template_into_the_worker() -> None:
    built = _kustomized()
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


def _build_args() -> dict[str, str]:
    """The Dockerfile's ARG defaults, by name."""
    return dict(a.split("=", 1) for kind, a in _instructions() if kind == "ARG" and "=" in a)


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: _expand(args[m.group(1)], args), text)


def _cuda_pair_matches(cuda_version: str, torch_cuda: str) -> bool:
    """13.0.2 goes with cu130, 12.8.1 with cu128: the CUDA base and the wheel index agree."""
    major, minor = cuda_version.split(".")[:2]
    return torch_cuda == f"cu{major}{minor}"


def test_dockerfile_cuda_flavour_is_one_consistent_pair_with_its_minimum_driver() -> None:
    args = _build_args()
    assert _cuda_pair_matches(args["CUDA_VERSION"], args["TORCH_CUDA"]), args
    assert not _cuda_pair_matches("12.8.1", "cu130")  # the check can fail
    text = DOCKERFILE.read_text()
    # Every flavour the header offers names a consistent pair and the driver it needs.
    rows = re.findall(r"^#\s+(\d+\.\d+\.\d+)\s+(cu\d+)\s+>= ([\d.]+)", text, re.MULTILINE)
    assert (args["CUDA_VERSION"], args["TORCH_CUDA"]) in {(c, t) for c, t, _ in rows}
    assert all(_cuda_pair_matches(c, t) for c, t, _ in rows) and len(rows) >= 2
    # The Kubernetes deployments build the same kind of pair.
    build = yaml.safe_load(DEPLOYMENTS_FILE.read_text())["build"]
    (step,) = [s[k] for s in build for k in s if k.endswith("build_docker_image")]
    assert set(step["buildargs"]) == {"CUDA_VERSION", "TORCH_CUDA"}
    assert _cuda_pair_matches(step["buildargs"]["CUDA_VERSION"], step["buildargs"]["TORCH_CUDA"])


def test_dockerfile_builds_a_non_root_cuda_image_of_the_project() -> None:
    instructions = _instructions()
    build_args = _build_args()
    (image,) = [_expand(a, build_args) for kind, a in instructions if kind == "FROM"]
    assert re.match(r"nvidia/cuda:|pytorch/pytorch:.*cuda", image), image

    runs = " ".join(args for kind, args in instructions if kind == "RUN")
    assert _expand(build_args["TORCH_INDEX_URL"], build_args).startswith("https://download.pytorch.org/whl/cu")
    assert re.search(r"pip install[^&]*\s\.(\s|$)", runs), "the project is not pip-installed"
    # torch.compile on the GPU: Triton builds its launcher with a C compiler and Python.h.
    apt = re.search(r"apt-get install ([^&]*)", runs)
    assert apt and {"gcc", "python3-dev"} <= set(apt.group(1).split()), runs
    # The locked environment, which holds NVML's bindings: each run logs its own GPU's
    # utilisation and memory through them.
    assert "--require-hashes -r /tmp/requirements.lock" in runs
    assert "\nnvidia-ml-py==" in (REPO / "requirements.lock").read_text()

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


# ------------------------------------------- the Kubernetes deployments (infra/k8s/prefect.yaml)

# What a user exports before deploying (infra/README.md), and what the build steps return.
DEPLOY_ENV = {
    "CIFAR_IMAGE_REPOSITORY": "registry.example.com/cifar-pipeline",
    "CIFAR10_SOURCE": "s3://cifar-pipeline/data/train.parquet",
    "CIFAR_COMPETITION_FILE": "s3://cifar-pipeline/data/cifar_test_nolabel.pkl",
    "PREFECT_UI_URL": "https://prefect.example.com",
}
STEP_OUTPUTS = {
    "commit": {"stdout": "3f9c2e1a7b4d", "stderr": ""},
    "build-image": {"image_name": DEPLOY_ENV["CIFAR_IMAGE_REPOSITORY"], "tag": "3f9c2e1a7b4d",
                    "image": IMAGE},
}
# The oldest minor version in EKS's and GKE's standard support when this was written; the
# manifests use nothing newer.
K8S_VERSION = "1.31.0"


def _deploy_file(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _k8s_deployments(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """infra/k8s/prefect.yaml's deployments, templated as `prefect deploy` templates them:
    `{{ $VAR }}` from the environment, then the build steps' outputs."""
    from prefect.utilities.templating import apply_values

    for key, value in DEPLOY_ENV.items():
        monkeypatch.setenv(key, value)
    deployments = {}
    for deployment in _deploy_file(DEPLOYMENTS_FILE)["deployments"]:
        deployment = apply_values(deployment, dict(os.environ), remove_notset=False)
        triggers = deployment.pop("triggers", None)  # event templates stay for run time
        deployment = apply_values(deployment, STEP_OUTPUTS)
        deployments[deployment["name"]] = {**deployment, "triggers": triggers}
    return deployments


async def _rendered_job(api_url: str, pool: str, job_variables: dict[str, Any]):
    """The Job that prefect-kubernetes' worker submits for a flow run of a deployment with
    these job variables, through its own job configuration class."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async with get_client() as client:
        work_pool = await client.read_work_pool(pool)
        config = await KubernetesWorkerJobConfiguration.from_template_and_values(
            work_pool.base_job_template, job_variables, client=client
        )
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="zippy-stoat"),
                                work_pool=work_pool, worker_name="k8s-worker")
    return config


def test_every_flow_has_a_kubernetes_deployment_named_as_on_the_process_pools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    k8s = _k8s_deployments(monkeypatch)
    local = {d["name"]: d for d in _deploy_file(REPO / "prefect.yaml")["deployments"]}
    # Same names and flows: the parent's child deployment, the alerts and the UI find them
    # whichever file was deployed last.
    assert set(k8s) == set(local) == {
        "train-resnets", "prepare-data", "train-variant", "score-competition"}
    pools = {name: d["work_pool"]["name"] for name, d in k8s.items()}
    assert pools == {"train-resnets": CPU_POOL, "prepare-data": CPU_POOL,
                     "train-variant": POOL, "score-competition": POOL}
    for name, deployment in k8s.items():
        assert deployment["entrypoint"] == local[name]["entrypoint"]
        assert deployment.get("parameters") == local[name].get("parameters")
        assert deployment.get("schedules") == local[name].get("schedules")
        assert deployment["triggers"] == local[name].get("triggers")
        variables = deployment["work_pool"]["job_variables"]
        assert variables["image"] == IMAGE  # the commit's tag, from the build step
        assert variables["gpu_count"] == (1 if pools[name] == POOL else 0)
        env = variables["env"]
        for key in ("CIFAR10_SOURCE", "CIFAR_COMPETITION_FILE", "PREFECT_UI_URL"):
            assert env[key] == DEPLOY_ENV[key], (name, key)
    child = k8s["train-resnets"]["parameters"]["config"]
    assert child["dispatch"] == "pool"


def test_build_steps_tag_the_image_with_the_commit_and_push_that_tag() -> None:
    import inspect

    from prefect_docker.deployments.steps import build_docker_image, push_docker_image

    spec = _deploy_file(DEPLOYMENTS_FILE)
    (commit, build), (push,) = (
        [next(iter(s.values())) for s in spec["build"]],
        [next(iter(s.values())) for s in spec["push"]],
    )
    assert commit["id"] == "commit" and build["id"] == "build-image"
    assert build["tag"] == "{{ commit.stdout }}"
    assert (push["image_name"], push["tag"]) == (
        "{{ build-image.image_name }}", "{{ build-image.tag }}")
    assert (REPO / build["dockerfile"]) == DOCKERFILE
    # The arguments are the steps' own (prefect-docker's signatures), not typos.
    for function, step in ((build_docker_image, build), (push_docker_image, push)):
        kwargs = {k: v for k, v in step.items() if k not in ("id", "requires")}
        inspect.signature(function).bind(**kwargs)
    # Every deployment runs the pushed tag, none a mutable default.
    for deployment in spec["deployments"]:
        assert deployment["work_pool"]["job_variables"]["image"] == "{{ build-image.image }}"


def _commit_step() -> dict[str, Any]:
    (step,) = [s["prefect.deployments.steps.run_shell_script"]
               for s in _deploy_file(DEPLOYMENTS_FILE)["build"]
               if "prefect.deployments.steps.run_shell_script" in s]
    return {k: v for k, v in step.items() if k not in ("id", "requires")}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A one-commit git repository with the image's sources."""
    for name in ("pyproject.toml", "README.md", "model/a.py", "tasks/a.py", "flows/a.py",
                 "infra/Dockerfile"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "c"]):
        subprocess.run([*git, *cmd], cwd=tmp_path, check=True)
    return tmp_path


def test_commit_step_prints_the_commit_of_a_clean_tree(
    checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.deployments.steps.utility import run_shell_script

    for key, value in DEPLOY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(checkout)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=checkout,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert asyncio.run(run_shell_script(**_commit_step()))["stdout"] == head

    # An empty competition file is allowed (nothing to score); an unset one is not.
    monkeypatch.setenv("CIFAR_COMPETITION_FILE", "")
    assert asyncio.run(run_shell_script(**_commit_step()))["stdout"] == head
    monkeypatch.delenv("CIFAR_COMPETITION_FILE")
    with pytest.raises(RuntimeError, match="CIFAR_COMPETITION_FILE is not set"):
        asyncio.run(run_shell_script(**_commit_step()))


@pytest.mark.parametrize("change", ["edit", "untracked"])
def test_commit_step_refuses_a_tree_the_tag_would_misname(
    checkout: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    from prefect.deployments.steps.utility import run_shell_script

    for key, value in DEPLOY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(checkout)
    target = checkout / "model" / ("a.py" if change == "edit" else "b.py")
    target.write_text("y\n")
    with pytest.raises(RuntimeError, match="uncommitted changes in the image's sources"):
        asyncio.run(run_shell_script(**_commit_step()))


def test_commit_step_refuses_an_unset_image_repository(
    checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.deployments.steps.utility import run_shell_script

    for key, value in DEPLOY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CIFAR_IMAGE_REPOSITORY")
    monkeypatch.chdir(checkout)
    with pytest.raises(RuntimeError, match="CIFAR_IMAGE_REPOSITORY is not set"):
        asyncio.run(run_shell_script(**_commit_step()))


def _validate(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _without_worker_quirk(job: dict[str, Any]) -> dict[str, Any]:
    """The Job less what prefect-kubernetes requires in the wrong place: `parallelism` and
    `completions` in the pod spec (its _validate_job_manifest insists on them there, see
    REQUIRED_JOB_SHAPE). The API server drops unknown fields of a client that asks for no
    strict field validation, as the worker's client does; anything else unknown fails."""
    job = copy.deepcopy(job)
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    return job


def test_every_deployment_renders_a_job_valid_for_kubernetes(
    prefect_api: str, created_pool: WorkPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each deployment's job variables, through prefect-kubernetes' own job configuration,
    into the Job its worker would create; the Job checked against Kubernetes' schema."""
    httpx.post(f"{prefect_api}/work_pools/", timeout=30, json={
        "name": CPU_POOL, "type": "kubernetes", "base_job_template": _template()})
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        for name, deployment in _k8s_deployments(monkeypatch).items():
            pool = deployment["work_pool"]["name"]
            config = asyncio.run(
                _rendered_job(prefect_api, pool, deployment["work_pool"]["job_variables"]))
            job = config.job_manifest
            _validate(_without_worker_quirk(job))
            assert _no_placeholders(job), name
            pod = job["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert container["image"] == IMAGE
            assert pod["serviceAccountName"] == "cifar-jobs"
            assert env["CIFAR10_SOURCE"] == DEPLOY_ENV["CIFAR10_SOURCE"]
            assert env["CIFAR_COMPETITION_FILE"] == DEPLOY_ENV["CIFAR_COMPETITION_FILE"]
            assert env["PREFECT_UI_URL"] == DEPLOY_ENV["PREFECT_UI_URL"]
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"  # the template's, kept
            assert env["PREFECT__FLOW_RUN_ID"]  # the worker's own, added
            gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            if pool == POOL:
                assert gpus == 1 and pod["tolerations"][0]["key"] == "nvidia.com/gpu", name
            else:
                # No GPU, not even through the NVIDIA runtime, and off the GPU nodes.
                assert gpus == 0 and pod["tolerations"] == [], name
                assert env["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_server_refuses_a_flow_run_without_an_image(
    prefect_api: str, created_pool: WorkPool
) -> None:
    """`image` is required and has no default: a run of a deployment that names none is
    refused when it is created, not left as a pod with no image."""
    async def run() -> None:
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("image-check")
            with_image = await client.create_deployment(
                flow_id=flow_id, name="with-image", work_pool_name=POOL,
                job_variables={"image": IMAGE})
            await client.create_flow_run_from_deployment(with_image)
            without = await client.create_deployment(
                flow_id=flow_id, name="without-image", work_pool_name=POOL,
                job_variables={"gpu_count": 1})
            with pytest.raises(Exception, match="image"):
                await client.create_flow_run_from_deployment(without)

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        asyncio.run(run())


def test_every_manifest_is_valid_for_kubernetes() -> None:
    built = _kustomized()
    assert len(built) >= 10
    for obj in [*built, *_docs()["secrets.example.yaml"]]:
        _validate(obj)
    # The check can fail: a misspelt field is refused.
    import kubernetes_validate

    broken = next(d for d in built if d["kind"] == "Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


# ------------------------------------------------------------------ the Helm values files

HELM = REPO / "infra" / "helm"
# The keys these files may set, from the charts of https://prefecthq.github.io/prefect-helm:
# prefect-worker releases after 2025.3.7033449 (its UPGRADING.md: `selfHostedServer`,
# `selfHostedServerApiConfig`) and prefect-server 2025/2026 releases, as their values.yaml
# and values.schema.json define them. Both schemas close `worker`, `worker.config`,
# `worker.config.baseJobTemplate`, `server` and `global.prefect` (additionalProperties:
# false), so Helm itself refuses a misspelt key there. No network here: this list is an
# excerpt of those files, not the charts themselves. A key ending in `[]` takes a list of
# Kubernetes objects, one ending in `{}` a free-form mapping.
CHART_KEYS = {
    "prefect-worker": {
        "fullnameOverride", "nameOverride", "namespaceOverride",
        "serviceAccount.create", "serviceAccount.name", "serviceAccount.annotations{}",
        "role.create", "role.extraPermissions[]", "rolebinding.create",
        "worker.apiConfig", "worker.clusterUid", "worker.replicaCount",
        "worker.selfHostedServerApiConfig.apiUrl",
        "worker.selfHostedServerApiConfig.basicAuth.enabled",
        "worker.selfHostedServerApiConfig.basicAuth.existingSecret",
        "worker.image.repository", "worker.image.prefectTag", "worker.image.pullPolicy",
        "worker.config.workPool", "worker.config.workQueues[]", "worker.config.type",
        "worker.config.installPolicy", "worker.config.limit", "worker.config.name",
        "worker.config.queryInterval", "worker.config.prefetchSeconds", "worker.config.http2",
        "worker.config.baseJobTemplate.configuration",
        "worker.config.baseJobTemplate.existingConfigMapName",
        "worker.extraEnvVars[]", "worker.extraEnvVarsSecrets[]", "worker.extraEnvVarsCMs[]",
        "worker.livenessProbe.enabled", "worker.resources.requests{}",
        "worker.resources.limits{}", "worker.nodeSelector{}", "worker.tolerations[]",
    },
    "prefect-server": {
        "fullnameOverride", "namespaceOverride",
        "global.prefect.image.repository", "global.prefect.image.prefectTag",
        "global.prefect.image.pullPolicy", "global.prefect.env[]",
        "server.uiConfig.prefectUiApiUrl", "server.env[]", "server.replicaCount",
        "server.basicAuth.enabled", "server.basicAuth.existingSecret",
        "server.resources.requests{}", "server.resources.limits{}",
        "service.type", "service.port", "ingress.enabled", "ingress.className",
        "ingress.host.hostname", "ingress.annotations{}", "ingress.tls",
        "secret.create", "secret.name",
        "postgresql.enabled", "postgresql.auth.enablePostgresUser", "postgresql.auth.username",
        "postgresql.auth.database", "postgresql.auth.password",
        "postgresql.primary.persistence.enabled",
    },
}
HELM_FILES = {
    "prefect-server.yaml": "prefect-server",
    "prefect-worker-gpu.yaml": "prefect-worker",
    "prefect-worker-cpu.yaml": "prefect-worker",
}


def _unknown_keys(values: dict[str, Any], allowed: set[str], prefix: str = "") -> list[str]:
    unknown = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if f"{path}[]" in allowed:
            assert isinstance(value, list), path
        elif f"{path}{{}}" in allowed:
            assert isinstance(value, dict), path
        elif isinstance(value, dict):
            unknown += _unknown_keys(value, allowed, f"{path}.")
        elif path not in allowed:
            unknown.append(path)
    return unknown


def test_helm_values_name_only_keys_the_charts_define() -> None:
    assert {p.name for p in HELM.glob("*.yaml")} == set(HELM_FILES)
    for name, chart in HELM_FILES.items():
        values = yaml.safe_load((HELM / name).read_text())
        assert _unknown_keys(values, CHART_KEYS[chart]) == [], name
    # The check can fail.
    assert _unknown_keys({"worker": {"config": {"workpool": "x"}}},
                         CHART_KEYS["prefect-worker"]) == ["worker.config.workpool"]


def test_helm_values_match_the_manifests() -> None:
    """The chart path and the manifest path set up the same pools, server and versions."""
    manifest = _one("Deployment", "prefect-worker")["spec"]["template"]["spec"]
    by_pool = {c["args"][c["args"].index("--pool") + 1]: c for c in manifest["containers"]}
    api_url = _one("ConfigMap", "prefect-worker-config")["data"]["PREFECT_API_URL"]
    for pool in (POOL, CPU_POOL):
        values = yaml.safe_load((HELM / f"prefect-worker-{pool.split('-')[1]}.yaml").read_text())
        worker = values["worker"]
        assert worker["config"]["workPool"] == pool
        assert worker["config"]["type"] == "kubernetes"
        assert worker["apiConfig"] == "selfHostedServer"
        assert worker["selfHostedServerApiConfig"]["apiUrl"] == api_url
        image = by_pool[pool]["image"]
        assert image.endswith(":" + worker["image"]["prefectTag"])
        extra = {e["name"]: e for e in worker["extraEnvVars"]}
        observer = "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"
        assert extra[observer]["valueFrom"] == {e["name"]: e for e in by_pool[pool]["env"]}[
            observer]["valueFrom"]
    server = yaml.safe_load((HELM / "prefect-server.yaml").read_text())
    # The server chart's release `prefect-server` in namespace `prefect` is what the workers
    # call; its Prefect version is theirs (the server image lacks only -kubernetes).
    assert api_url.startswith("http://prefect-server.prefect.svc.cluster.local:4200/")
    assert f"{server['global']['prefect']['image']['prefectTag']}-kubernetes" == (
        manifest["containers"][0]["image"].split(":")[1])
    env = {e["name"]: e["value"] for e in server["global"]["prefect"]["env"]}
    ui = env["PREFECT_UI_URL"]
    assert server["server"]["uiConfig"]["prefectUiApiUrl"] == f"{ui}/api"
    assert server["postgresql"]["enabled"] is True
    assert server["postgresql"]["primary"]["persistence"]["enabled"] is True
    assert server["postgresql"]["auth"]["password"] == "CHANGE-ME"  # set at install
