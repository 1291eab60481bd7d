"""Provisioning the local stack once its services answer: the buckets, the work pools
with their concurrency limits, the deployments of prefect.yaml, the failure alerts of
`infra/automations.yaml`, and the workers.

The `gpu` pool is capped at the flow runs its workers can take, one per GPU (or CPU slot):
a run beyond that waits in Prefect, Scheduled, until a GPU frees up.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import subprocess
import time
import urllib.error
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from infra import alerts, procs, services, workers
from infra.procs import StackError
from infra.services import ARTIFACT_BUCKET, OBJECT_BUCKET, REPO, Stack, prefect_call, tool_env

POOLS = ("gpu", "cpu")
DEFAULT_CPU_SLOTS = 2  # gpu-pool workers on a machine without GPUs
CPU_POOL_WORKERS = 1  # workers on the cpu pool (parent flows, data preparation)
WORKER_TIMEOUT = 90.0  # seconds for the workers to report to their pools


def ensure_buckets(stack: Stack) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = services.s3_client(stack)
    try:
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in (ARTIFACT_BUCKET, OBJECT_BUCKET):
            if bucket in existing:
                continue
            region = client.meta.region_name
            extra = ({} if region == "us-east-1"
                     else {"CreateBucketConfiguration": {"LocationConstraint": region}})
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=bucket, **extra)
            print(f"  bucket s3://{bucket} created")
    except (BotoCoreError, ClientError) as e:
        raise StackError(f"creating the buckets {ARTIFACT_BUCKET} and {OBJECT_BUCKET} at "
                         f"{stack.s3_endpoint} failed: {e}; check the endpoint and the "
                         "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from e


def _prefect_cli(stack: Stack, args: list[str], log_name: str, timeout: float) -> None:
    log = procs.log_path(stack.root, log_name)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [procs.tool("prefect"), *args]
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        out.flush()
        try:
            result = subprocess.run(argv, cwd=REPO, env=tool_env(stack), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise StackError(f"`prefect {' '.join(args)}` took over {timeout:.0f} s; "
                             f"see {log}") from e
    if result.returncode != 0:
        raise StackError(f"`prefect {' '.join(args)}` failed ({result.returncode}); "
                         f"its output, {log}, ends:\n{procs.log_tail(log)}")


def read_pool(stack: Stack, pool: str) -> dict | None:
    """The work pool as the API has it, or None if there is none of that name."""
    try:
        return prefect_call(stack, f"/work_pools/{pool}")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise StackError(f"reading work pool {pool!r} failed: HTTP {e.code}; see "
                         f"{procs.log_path(stack.root, 'prefect')}") from e
    except OSError as e:
        raise StackError(f"the Prefect server at {stack.prefect_url} stopped answering "
                         f"({e}); see {procs.log_path(stack.root, 'prefect')}") from e


def pool_limits(plan: Sequence[workers.Worker]) -> dict[str, int | None]:
    """The gpu pool is capped at the runs its workers take; the cpu pool's parents only wait."""
    return {"gpu": workers.pool_limit([w for w in plan if w.pool == "gpu"]), "cpu": None}


def ensure_pools(stack: Stack, limits: Mapping[str, int | None]) -> None:
    """Create the missing process pools and set each pool's limit where `limits` has one
    (None: the pool's limit is left as it is)."""
    found = {pool: read_pool(stack, pool) for pool in POOLS}

    def provision(pool: str) -> None:
        if found[pool] is not None and found[pool].get("type") != "process":
            print(f"  warning: work pool {pool!r} exists with type "
                  f"{found[pool].get('type')!r}, not 'process'; left as it is")
            return
        if found[pool] is None:
            # The CLI fills in the process worker's default base job template.
            _prefect_cli(stack, ["--no-prompt", "work-pool", "create", pool, "--type",
                                 "process"], f"prefect-cli-{pool}", timeout=120)
            print(f"  work pool {pool!r} created")
        limit = limits.get(pool)
        if limit is not None and (found[pool] or {}).get("concurrency_limit") != limit:
            try:
                prefect_call(stack, f"/work_pools/{pool}", method="PATCH",
                             body={"concurrency_limit": limit})
            except OSError as e:  # HTTPError included
                raise StackError(f"setting work pool {pool!r}'s concurrency limit to {limit} "
                                 f"failed ({e}); see "
                                 f"{procs.log_path(stack.root, 'prefect')}") from e
            print(f"  work pool {pool!r}: at most {limit} flow run(s) at once")

    with ThreadPoolExecutor(len(POOLS)) as threads:
        list(threads.map(provision, POOLS))


def deploy(stack: Stack) -> None:
    if not (REPO / "prefect.yaml").is_file():
        raise StackError(f"no prefect.yaml in {REPO}, so nothing to deploy; "
                         "pass --no-deploy to bring the stack up without deployments")
    print("  prefect deploy --all ...", flush=True)
    _prefect_cli(stack, ["--no-prompt", "deploy", "--all"], "deploy", timeout=600)
    print(f"  deployed (log: {procs.log_path(stack.root, 'deploy')})")


def ensure_alerts(stack: Stack) -> None:
    """The failure alerts, posted to CIFAR_ALERT_WEBHOOK_URL when set, else to the
    stack's receiver (which appends them to `<state>/stack/alerts.jsonl`)."""
    webhook = os.environ.get(alerts.WEBHOOK_ENV) or stack.alerts_url
    for line in alerts.apply(functools.partial(prefect_call, stack), webhook, stack.prefect_url):
        print(f"  {line}; alerts go to {alerts.redacted(webhook)}")


def worker_plan(count: int | None, cpu_slots: bool,
                cpu_pool_workers: int = CPU_POOL_WORKERS) -> list[workers.Worker]:
    """gpu-pool workers (one per GPU, or CPU slots) and the cpu pool's workers."""
    prefect = procs.tool("prefect")
    gpus = [] if cpu_slots else workers.detect_gpus()
    if cpu_slots or not gpus:
        planned = workers.plan("gpu", [], cpu_slots=count or DEFAULT_CPU_SLOTS, prefect=prefect)
    else:
        if count is not None and count > len(gpus):
            raise StackError(f"--workers {count}, but this machine has {len(gpus)} GPU(s); "
                             "pass --cpu-slots to run workers without a GPU")
        planned = workers.plan("gpu", gpus, only=gpus[:count] if count else None, prefect=prefect)
    if cpu_pool_workers:
        planned += workers.plan("cpu", [], cpu_slots=cpu_pool_workers,
                                limit=workers.CPU_POOL_LIMIT, prefect=prefect)
    return planned


def _reported_since(worker: Mapping, started_at: float) -> bool:
    beat = worker.get("last_heartbeat_time")
    if worker.get("status") != "ONLINE" or not beat:
        return False
    # The server and the worker share this machine's clock; allow for rounding.
    return datetime.fromisoformat(beat).timestamp() >= started_at - 1


def ensure_workers(stack: Stack, supervisor: procs.Supervisor,
                   plan: Sequence[workers.Worker], timeout: float = WORKER_TIMEOUT) -> None:
    root = stack.root
    for line in workers.stop_workers(root, keep={w.file_name for w in plan}):
        print(f"  {line} (no longer wanted)")
    for line in workers.start_workers(root, plan, tool_env(stack), cwd=str(REPO)):
        print(f"  {line}")
    # Up means the workers poll: wait until each has reported to its pool since it started
    # (its pool may still list an earlier process of the same name as online).
    deadline = time.monotonic() + timeout
    missing = {(w.pool, w.name) for w in plan}
    info = supervisor.info()
    since = {(w.pool, w.name): info.get(w.file_name, {}).get("start", 0) for w in plan}
    while missing:
        info = supervisor.info()
        for w in plan:
            if (w.pool, w.name) in missing and info[w.file_name]["statename"] == "FATAL":
                log = procs.log_path(root, w.file_name)
                raise StackError(f"worker {w.name} kept exiting while starting; its log, "
                                 f"{log}, ends:\n{procs.log_tail(log)}")
        for pool in {p for p, _ in missing}:
            with contextlib.suppress(OSError, ValueError):
                for seen in prefect_call(stack, f"/work_pools/{pool}/workers/filter",
                                         method="POST", body={}):
                    key = (pool, seen["name"])
                    if key in missing and _reported_since(seen, since[key]):
                        missing.discard(key)
        if missing and time.monotonic() > deadline:
            names = ", ".join(n for _, n in sorted(missing))
            raise StackError(f"worker(s) {names} did not report to their pool in "
                             f"{timeout:.0f} s; see {root / 'logs'}")
        if missing:
            time.sleep(1)
    for w in plan:  # past supervisord's start-up window too, as `status` wants
        supervisor.wait_running(w.file_name, procs.START_SECONDS + 5)
    print(f"  {len(plan)} worker(s) online")
