"""The local stack: PostgreSQL, SeaweedFS's S3, the Prefect and MLflow servers, the alert
receiver and the workers, on 127.0.0.1, kept running by supervisord.

    python -m infra.stack up [--state-dir DIR] [--workers N] [--cpu-slots] [--no-deploy]
                             [--cpu-pool-workers N] [--auth | --no-auth] [--timeout S]
    python -m infra.stack status | down [--state-dir DIR]

What each step does, and what `up` again, `status` and `down` do: infra/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from infra import postgres, procs, provision, services, workers
from infra.procs import StackError, Supervisor, stack_dir
from infra.services import SERVICES, Stack, client_env, free_ports, healthy
from tasks.settings import file_lock

UP_TIMEOUT = 1800.0  # seconds to wait for another `up` or `down` on the same state directory
PORT_WAIT = 75.0  # seconds a taken port may take to be released: TCP's TIME_WAIT is 60


def configure(root: Path, auth: bool | None) -> Stack:
    """The stack of stack.json, or a new one with free ports; settings that cannot change
    under running services (S3 endpoint, auth) are checked here."""
    external = os.environ.get("CIFAR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
    # Auth is on unless asked off, and kept once chosen.
    stack = Stack.load(root) or Stack(root, {}, external, auth is not False)
    missing = [name for name in services.PORTS if name not in stack.ports]
    if missing:  # a new stack, or one from before a service was added
        taken = set(stack.ports.values())
        fresh = [p for p in free_ports(len(missing) + len(taken)) if p not in taken]
        stack.ports.update(zip(missing, fresh, strict=False))
        stack.save()
    changes = {}
    if external != stack.s3_external:
        changes["S3 endpoint"] = (stack.s3_external or "SeaweedFS", external or "SeaweedFS")
    if auth is not None and auth != stack.auth:
        changes["auth"] = ("on" if stack.auth else "off", "on" if auth else "off")
    if changes:
        if Supervisor(root).running():
            what = "; ".join(f"{k}: running with {a}, asked for {b}"
                             for k, (a, b) in changes.items())
            raise StackError(f"the stack is running with other settings ({what}); run "
                             "`down` first, then `up` again")
        stack.s3_external = external
        stack.auth = stack.auth if auth is None else auth
        stack.save()
    return stack


def ensure_services(stack: Stack, supervisor: Supervisor, timeout: float) -> None:
    """Each stage's services running and answering, then what the next stage needs."""
    password = services.secrets_for(stack)["postgres_password"]
    deadline = time.monotonic() + timeout
    for stage in stack.stages():
        running = {n for n, p in supervisor.info().items() if p["statename"] == "RUNNING"}
        for name in stage:
            if name == "postgres":
                postgres.prepare(stack, password)
            for port in (stack.ports[p] for p in (services.S3_PORTS if name == "s3" else [name])):
                if name not in running:
                    _wait_port_free(stack, name, port, min(deadline, time.monotonic() + PORT_WAIT))
        for line in supervisor.apply([SERVICES[n].program(stack) for n in stage]):
            print(f"  {line}")
        for name in stage:
            _wait_healthy(stack, supervisor, name, deadline)
        if "postgres" in stage:
            postgres.ensure_databases(stack, password)
            provision.ensure_buckets(stack)


def _wait_port_free(stack: Stack, name: str, port: int, until: float) -> None:
    """A server of this stack that was just killed can hold its port for a moment, and a
    connection that took the port as its own end holds it a minute (TIME_WAIT): wait that
    out, then name whoever still listens on it."""
    if services.port_free(port):
        return
    print(f"  port {port} for {name} is in use; waiting for it")
    while not services.port_free(port):
        if time.monotonic() > until:
            holders = procs.port_holders(port)
            raise StackError(f"port {port} for {name} is taken by {holders or 'a process'}, "
                             f"which this stack did not start; stop it, or delete "
                             f"{stack.root / 'stack.json'} so that `up` picks new ports")
        time.sleep(0.5)


def _wait_healthy(stack: Stack, supervisor: Supervisor, name: str, deadline: float) -> None:
    began = time.monotonic()
    while not healthy(stack, name):
        state = supervisor.info().get(name, {})
        if state.get("statename") == "FATAL" or time.monotonic() > deadline:
            log = procs.log_path(stack.root, name)
            why = ("kept exiting" if state.get("statename") == "FATAL"
                   else "did not answer in time")
            raise StackError(f"{name} {why} ({state.get('description', 'no state')}); its "
                             f"log, {log}, ends:\n{procs.log_tail(log)}")
        time.sleep(0.5)
    # And past supervisord's start-up window, so that `status` says RUNNING at once.
    supervisor.wait_running(name, procs.START_SECONDS + 5)
    print(f"  {name:<8} answering ({time.monotonic() - began:.1f} s)")


def cmd_up(args: argparse.Namespace) -> int:
    root = stack_dir(args.state_dir)
    began = time.monotonic()
    with file_lock(root / ".lock", UP_TIMEOUT, "running `up` or `down`"):
        stack = configure(root, args.auth)
        print(f"stack under {root}")
        root.chmod(0o711)  # others may enter it (PostgreSQL's user must), not list it
        if not stack.auth:
            print("warning: auth is off: any process on this machine can use this stack's "
                  "Prefect and MLflow APIs; `down`, then `up --auth`, turns it on",
                  file=sys.stderr)
        # Planned first: a --workers this machine cannot serve fails before anything starts.
        plan = provision.worker_plan(args.workers, args.cpu_slots, args.cpu_pool_workers)
        supervisor = Supervisor(root)
        supervisor.start()
        ensure_services(stack, supervisor, args.timeout)
        procs.write_text(root / "env", procs.render_env_file(client_env(stack)), mode=0o600)
        provision.ensure_pools(stack, provision.pool_limits(plan))
        if not args.no_deploy:
            provision.deploy(stack)
        provision.ensure_alerts(stack)
        provision.ensure_workers(stack, supervisor, plan)
    print(f"up in {time.monotonic() - began:.1f} s\n")
    print_status(stack)
    print(f"\nuse it from a shell:  source {root / 'env'}")
    return 0


def print_status(stack: Stack) -> bool:
    """One line per service and worker: URL, pid, state, health, restarts."""
    supervisor = Supervisor(stack.root)
    info, restarts = supervisor.info(), supervisor.restarts()

    def row(name: str, where: str, health: bool) -> bool:
        state = info.get(name, {})
        pid = state.get("pid") or "-"
        count, last = restarts.get(name, (0, ""))
        extra = f"  restarted {count}x, last exit {last}" if count else ""
        print(f"{name:<32} {where:<28} pid {pid!s:<8} {state.get('statename', 'STOPPED'):<8} "
              f"{'ok' if health else 'down'}{extra}")
        return health and state.get("statename") == "RUNNING"

    names = [name for stage in stack.stages() for name in stage]
    ok = all([row(n, SERVICES[n].url(stack), healthy(stack, n)) for n in names])
    if stack.s3_external is not None:
        health = healthy(stack, "s3")  # the same ListBuckets, on the user's endpoint
        ok = ok and health
        print(f"{'s3':<32} {stack.s3_endpoint:<28} {'external':<21} {'ok' if health else 'down'}")
    names = workers.worker_names(info)
    ok = all([row(n, "", info[n]["statename"] == "RUNNING") for n in names]) and ok
    if not names:
        ok = False
        print("no workers")
    if stack.auth:
        print(f"auth     on (credentials in {stack.root / 'env'})")
    if healthy(stack, "prefect") and (failed := _undelivered_alerts(stack)):
        print(f"alerts   {failed}")
    return ok


def _undelivered_alerts(stack: Stack) -> str | None:
    """The alerts of the last day that the automations could not post (a webhook that
    failed or never answered), which Prefect records only as events."""
    since = datetime.now(UTC) - timedelta(days=1)
    found = services.prefect_call(stack, "/events/filter", method="POST", body={
        "filter": {"event": {"name": ["prefect.automation.action.failed"]},
                   "occurred": {"since": since.isoformat()}}, "limit": 1})
    if not found["total"]:
        return None
    last = found["events"][0]
    return (f"{found['total']} not delivered in the last day; the last at "
            f"{last['occurred'][:19]}: {last['payload'].get('reason')}")


def cmd_status(args: argparse.Namespace) -> int:
    root = stack_dir(args.state_dir)
    stack = Stack.load(root)
    if stack is None:
        print(f"no stack under {root}; start one with `up`")
        return 1
    return 0 if print_status(stack) else 1


def cmd_down(args: argparse.Namespace) -> int:
    root = stack_dir(args.state_dir)
    with file_lock(root / ".lock", UP_TIMEOUT, "running `up` or `down`"):
        supervisor = Supervisor(root)
        if supervisor.running():
            names = supervisor.programs()
            # Workers first, so that they do not lose their server mid-run; then the
            # services in the reverse of their start order, the databases last.
            order = [*workers.worker_names(names), *reversed(SERVICES)]
            supervisor.stop([n for n in order if n in names]
                            + [n for n in names if n not in order])
            supervisor.shutdown()
            print(f"stopped {len(names)} program(s) and supervisord")
        leftovers = procs.stack_processes(root)
        if leftovers:
            killed = procs.stop_processes(leftovers, procs.STOP_TIMEOUT)
            print(f"stopped {len(leftovers)} more process(es) of this stack ({killed} killed)")
    print(f"stopped; data kept under {root}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.split("\n")[0],
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
                    help="MLflow basic-auth and a Prefect API auth string (on for a new "
                    "stack; kept once chosen)")
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
