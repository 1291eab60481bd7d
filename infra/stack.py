"""The local stack: Prefect server, MLflow server, S3 (moto) and workers, on 127.0.0.1.

    python infra/stack.py up [--state-dir DIR] [--workers N] [--cpu-slots] [--no-deploy]
                             [--cpu-pool-workers N] [--auth | --no-auth] [--timeout S]
    python infra/stack.py status [--state-dir DIR]
    python infra/stack.py down [--state-dir DIR]

`up` starts what is not already running, each in its own session with its log in
`<state>/stack/logs/` and its pid in `<state>/stack/pids/`:
  - moto's S3 server, unless CIFAR_S3_ENDPOINT or AWS_ENDPOINT_URL_S3 names an endpoint;
  - `prefect server start` (SQLite under `<state>/stack/prefect`);
  - `mlflow server` (SQLite `<state>/stack/mlflow.db`, artifacts proxied to
    s3://cifar-mlflow/artifacts);
  - the alert receiver of `infra/alerts.py` (appends to `<state>/stack/alerts.jsonl`);
then waits until they answer, creates the buckets `cifar-mlflow` and `cifar-pipeline`,
the process work pools `gpu` (capped at one flow run per GPU or CPU slot) and `cpu`,
runs `prefect deploy --all` in the repository (unless --no-deploy), applies the failure
alerts of `infra/automations.yaml` (to CIFAR_ALERT_WEBHOOK_URL, else the receiver), and
starts the workers of `infra/workers.py`: one per GPU on the `gpu` pool (or N CPU slots
where there is no GPU, or with --cpu-slots), and one worker on the `cpu` pool. Ports are chosen on
the first `up` and kept in `<state>/stack/stack.json`.
The settings clients need go to `<state>/stack/env`: `source` it to use the stack.

A service whose recorded process is alive and answers is left alone, so `up` can be run
again at any time; a dead one is restarted on its port. `down` stops exactly the recorded
processes (and what they started) and keeps the data. `--auth` turns on MLflow's
basic-auth app and Prefect's API auth string, with passwords generated once and kept in
`<state>/stack/secrets.json` (mode 0600).

The stack's parts: `infra/services.py` (settings, credentials, the servers),
`infra/provision.py` (buckets, pools and their limits, deployments, alerts, workers),
`infra/procs.py` (process records and stop, shared with `infra/workers.py`). Standard
library, boto3 and the `prefect`, `mlflow` and moto command lines. Never imported by the
project's code.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: `python infra/stack.py ...`
    sys.path.insert(0, str(REPO))

from infra import procs, provision, services, workers  # noqa: E402
from infra.procs import StackError, render_env_file, write_text  # noqa: E402
from infra.services import Stack, client_env, free_ports, healthy  # noqa: E402


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """One `up` or `down` at a time per state directory."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another `up` or `down` on {root} ...", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _any_running(root: Path) -> bool:
    return any(procs.matches(r) for r in procs.records(root).values())


def configure(root: Path, auth: bool | None) -> Stack:
    """The stack of stack.json, or a new one with free ports; settings that cannot change
    under running services (S3 endpoint, auth) are checked here."""
    external = services.external_s3_endpoint(os.environ)
    stack = Stack.load(root)
    if stack is None:
        names = ["moto", "prefect", "mlflow", "alerts"]
        stack = Stack(root, dict(zip(names, free_ports(len(names)), strict=True)), external,
                      bool(auth))
        stack.save()
        return stack
    if "alerts" not in stack.ports:  # a stack.json from before the alert receiver
        taken = set(stack.ports.values())
        stack.ports["alerts"] = next(p for p in free_ports(len(taken) + 1) if p not in taken)
        stack.save()
    changes = {}
    if external != stack.s3_external:
        changes["S3 endpoint"] = (stack.s3_external or "moto", external or "moto")
    if auth is not None and auth != stack.auth:
        changes["auth"] = ("on" if stack.auth else "off", "on" if auth else "off")
    if changes:
        if _any_running(root):
            what = "; ".join(f"{k}: running with {a}, asked for {b}"
                             for k, (a, b) in changes.items())
            raise StackError(f"the stack is running with other settings ({what}); run "
                             "`down` first, then `up` again")
        stack.s3_external = external
        stack.auth = stack.auth if auth is None else auth
        if "moto" not in stack.ports:
            stack.ports["moto"] = free_ports(1)[0]
        stack.save()
    return stack


def check_auth_support() -> None:
    """MLflow's basic-auth app needs Flask-WTF (the `mlflow[auth]` extra); say so before
    starting anything rather than in a traceback in mlflow.log."""
    if importlib.util.find_spec("flask_wtf") is None:
        raise StackError("--auth needs MLflow's basic-auth app, which needs Flask-WTF: "
                         f"{sys.executable} -m pip install 'mlflow[auth]'")


def cmd_up(args: argparse.Namespace) -> int:
    root = procs.stack_dir(args.state_dir)
    began = time.monotonic()
    with locked(root):
        stack = configure(root, args.auth)
        if stack.auth:
            check_auth_support()
        print(f"stack under {root}")
        # Planned first: a --workers this machine cannot serve fails before anything starts.
        plan = provision.worker_plan(args.workers, args.cpu_slots, args.cpu_pool_workers)
        services.ensure_services(stack, args.timeout)
        write_text(root / "env", render_env_file(client_env(stack)), mode=0o600)
        provision.ensure_buckets(stack)
        provision.ensure_pools(stack, provision.pool_limits(plan))
        if not args.no_deploy:
            provision.deploy(stack)
        try:
            provision.ensure_alerts(stack)
        except StackError as exc:
            # Alerts must not keep the workers down: a Prefect server restarted over a
            # busy database answers its automations API with 503 for a while.
            print(f"warning: failure alerts not applied: {exc}; run `python infra/alerts.py "
                  "apply` (or `stack up` again) once the server is settled", file=sys.stderr)
        provision.ensure_workers(stack, plan)
    print(f"up in {time.monotonic() - began:.1f} s\n")
    print_status(stack)
    print(f"\nuse it from a shell:  source {root / 'env'}")
    return 0


def print_status(stack: Stack) -> bool:
    urls = {"moto": stack.s3_endpoint, "prefect": stack.prefect_url, "mlflow": stack.mlflow_url,
            "alerts": stack.alerts_url}
    ok = True
    for name in stack.services():
        record = procs.running(stack.root, name)
        health = healthy(stack, name)
        ok = ok and health and record is not None
        pid = record["pid"] if record else "-"
        print(f"{name:<8} {urls[name]:<28} pid {pid!s:<8} {'ok' if health else 'down'}")
    if stack.s3_external is not None:
        health = healthy(stack, "moto")  # the same list_buckets check, on the user's endpoint
        ok = ok and health
        print(f"{'s3':<8} {stack.s3_endpoint:<28} {'external':<12} {'ok' if health else 'down'}")
    rows = workers.worker_status(stack.root)
    for name, pid, alive in rows:
        ok = ok and alive
        print(f"{name:<37} pid {pid:<8} {'alive' if alive else 'down'}")
    if not rows:
        ok = False
        print("no workers")
    if stack.auth:
        print(f"auth     on (credentials in {stack.root / 'env'})")
    return ok


def cmd_status(args: argparse.Namespace) -> int:
    root = procs.stack_dir(args.state_dir)
    stack = Stack.load(root)
    if stack is None:
        print(f"no stack under {root}; start one with `up`")
        return 1
    return 0 if print_status(stack) else 1


def cmd_down(args: argparse.Namespace) -> int:
    root = procs.stack_dir(args.state_dir)
    if not (root / "pids").is_dir():
        print(f"nothing recorded under {root / 'pids'}; nothing to stop")
        return 0
    with locked(root):
        # Workers first, so that they do not lose their server mid-run; the servers last.
        lines = workers.stop_workers(root)
        order = ["alerts", "mlflow", "prefect", "moto"]
        others = [n for n in procs.records(root) if n not in order]
        lines += procs.stop_many(root, others + [n for n in order
                                                 if procs.read_record(root, n)])
        for name in (root / "pids").glob("*.pid"):  # pid files without a record
            name.unlink(missing_ok=True)
    for line in lines:
        print(line)
    print(f"stopped; data kept under {root}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infra/stack.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="default $CIFAR_STATE_DIR, else ./.pipeline")
    up = sub.add_parser("up", parents=[common], help="start what is not running")
    up.add_argument("--workers", type=int, metavar="N",
                    help="gpu-pool workers: default one per GPU, or 2 CPU slots without GPUs")
    up.add_argument("--cpu-slots", action="store_true",
                    help="run the gpu-pool workers without a GPU even where there are GPUs")
    cpu_workers = provision.CPU_POOL_WORKERS
    up.add_argument("--cpu-pool-workers", type=int, default=cpu_workers, metavar="N",
                    help="workers on the cpu pool (parent flows, data preparation; default "
                         f"{cpu_workers}, each taking {workers.CPU_POOL_LIMIT} runs)")
    up.add_argument("--no-deploy", action="store_true", help="skip `prefect deploy --all`")
    up.add_argument("--auth", action=argparse.BooleanOptionalAction, default=None,
                    help="MLflow basic-auth and a Prefect API auth string (kept once chosen)")
    timeout = services.HEALTH_TIMEOUT
    up.add_argument("--timeout", type=float, default=timeout,
                    help=f"seconds for the services to answer (default {timeout:.0f})")
    up.set_defaults(handler=cmd_up)
    sub.add_parser("status", parents=[common], help="URLs, pids, health; exit 1 if not all ok"
                   ).set_defaults(handler=cmd_status)
    sub.add_parser("down", parents=[common], help="stop what up started; keep the data"
                   ).set_defaults(handler=cmd_down)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "workers", None) is not None and args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if getattr(args, "cpu_pool_workers", 0) < 0:
        print("error: --cpu-pool-workers must be at least 0", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.action == "up":
            print("what did start keeps running: `status` lists it, `down` stops it, and "
                  "`up` again starts the rest", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
