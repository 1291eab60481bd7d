"""Prefect process workers for this machine: one per GPU, each pinned to its GPU.

    python -m infra.workers start --pool gpu [--gpus 0,1] [--state-dir DIR]
    python -m infra.workers start --pool gpu --cpu-slots 2      # no GPU: N CPU slots
    python -m infra.workers start --pool gpu --share-gpu --limit 2
    python -m infra.workers stop | status [--pool gpu] [--state-dir DIR]

Each GPU (`nvidia-smi -L`) gets one `prefect worker start --type process --limit 1` with
CUDA_VISIBLE_DEVICES=<index>, so two runs never share a GPU. Workers are programs
`worker.<pool>.<name>` of the state directory's supervisord (`infra/procs.py`), which
restarts them. They poll PREFECT_API_URL, or the server of `<state>/stack/env` if `up`
wrote one. The pool's concurrency limit is left to the user: other machines may serve it.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from infra.procs import Program, StackError, Supervisor, read_env_file, stack_dir, tool

CPU_POOL_LIMIT = 4  # flow runs at once on a worker of a pool without GPUs
# How often an idle worker asks for work: a GPU that finishes a run starts the next queued
# one within seconds instead of Prefect's default 10.
QUERY_SECONDS = 2


def parse_gpus(text: str) -> list[int]:
    """GPU indices of `nvidia-smi -L` output; MIG instances (indented lines) not counted."""
    return [int(m[1]) for m in re.finditer(r"^GPU (\d+): ", text, re.MULTILINE)]


def detect_gpus(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[int]:
    """This machine's GPUs by `nvidia-smi -L`; none when it is absent or fails (a driver
    not loaded), which is said on stderr."""
    try:
        result = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, PermissionError):
        return []
    except subprocess.TimeoutExpired:
        print("warning: `nvidia-smi -L` hung for 30 s; counting no GPUs", file=sys.stderr)
        return []
    if result.returncode != 0:
        print(f"warning: `nvidia-smi -L` failed ({result.returncode}): "
              f"{(result.stderr or result.stdout).strip()[:200]}; counting no GPUs",
              file=sys.stderr)
        return []
    return parse_gpus(result.stdout)


def host_name() -> str:
    """The short host name, reduced to characters safe in worker and file names."""
    name = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "host"


@dataclass(frozen=True)
class Worker:
    name: str  # the worker's name in the pool, unique per pool
    pool: str
    gpu: int | None  # the GPU it may see; None: no GPU at all
    limit: int  # flow runs at once
    argv: list[str]

    @property
    def file_name(self) -> str:
        return f"worker.{self.pool}.{self.name}"

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", str(QUERY_SECONDS))
        if self.gpu is None:
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            # nvidia-smi numbers GPUs in PCI bus order; make CUDA count the same way.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        return env


def plan(pool: str, gpus: Sequence[int], *, cpu_slots: int | None = None,
         only: Iterable[int] | None = None, share_gpu: bool = False, limit: int = 1,
         host: str | None = None, prefect: str = "prefect") -> list[Worker]:
    """The workers to run: one per GPU (or per GPU of `only`), or `cpu_slots` without one."""
    host = host or host_name()
    if limit < 1:
        raise StackError(f"--limit must be at least 1, got {limit}")
    if cpu_slots is not None:
        if cpu_slots < 1:
            raise StackError(f"--cpu-slots must be at least 1, got {cpu_slots}")
        return _workers(pool, [(f"{host}-cpu{i}", None) for i in range(cpu_slots)], limit,
                        prefect)
    if not gpus:
        raise StackError("no GPU found by `nvidia-smi -L`; pass --cpu-slots N to start N "
                         "workers without a GPU instead")
    if limit > 1 and not share_gpu:
        raise StackError(f"--limit {limit} would run {limit} flow runs on one GPU; "
                         "pass --share-gpu if that is what you want")
    chosen = list(gpus if only is None else only)
    unknown = [i for i in chosen if i not in gpus]
    if unknown:
        raise StackError(f"GPU(s) {unknown} not found; `nvidia-smi -L` lists {list(gpus)}")
    if not chosen:
        raise StackError("no GPU chosen; name at least one in --gpus")
    return _workers(pool, [(f"{host}-gpu{i}", i) for i in dict.fromkeys(chosen)], limit,
                    prefect)


def _workers(pool: str, slots: list[tuple[str, int | None]], limit: int,
             prefect: str) -> list[Worker]:
    return [Worker(name, pool, gpu, limit, [prefect, "worker", "start", "--pool", pool,
                                            "--type", "process", "--name", name,
                                            "--limit", str(limit)])
            for name, gpu in slots]


def pool_limit(workers: Sequence[Worker]) -> int:
    """Flow runs a pool may run at once: one per GPU (or CPU slot) its workers serve, or
    more where --share-gpu lets a worker take several."""
    return sum(w.limit for w in workers)


def start_workers(root: Path, workers: Sequence[Worker], env: Mapping[str, str],
                  cwd: str | None = None) -> list[str]:
    """Run each worker under the state directory's supervisord; one already running with
    the same settings is left alone. Returns what changed."""
    if not env.get("PREFECT_API_URL"):
        # Without it each worker would start an in-process server of its own.
        raise StackError("PREFECT_API_URL is not set: point it at the Prefect server "
                         "(`python -m infra.stack up` writes <state>/stack/env)")
    supervisor = Supervisor(root)
    supervisor.start()
    programs = [Program(w.file_name, w.argv, w.environment(env), cwd) for w in workers]
    return supervisor.apply(programs)


def worker_names(names: Iterable[str], pool: str | None = None) -> list[str]:
    prefix = f"worker.{pool}." if pool else "worker."
    return sorted(n for n in names if n.startswith(prefix))


def stop_workers(root: Path, pool: str | None = None, keep: Iterable[str] = ()) -> list[str]:
    """Stop the workers (of `pool`, if given) whose names are not in `keep`."""
    supervisor = Supervisor(root)
    if not supervisor.running():
        return []
    names = [n for n in worker_names(supervisor.programs(), pool) if n not in set(keep)]
    supervisor.stop(names)
    return [f"{n}: stopped" for n in names]


def _parse_gpus(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes indices like 0,1; got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.workers",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="default $CIFAR_STATE_DIR, else ./.pipeline")
    st = sub.add_parser("start", parents=[common], help="start the workers not yet running")
    st.add_argument("--pool", required=True, help="work pool to poll (e.g. gpu)")
    st.add_argument("--cpu-slots", type=int, metavar="N",
                    help="start N workers with no GPU visible instead of one per GPU")
    st.add_argument("--gpus", type=_parse_gpus, metavar="0,1",
                    help="only these GPUs (default: all that nvidia-smi lists)")
    st.add_argument("--share-gpu", action="store_true",
                    help="allow --limit > 1 on a GPU worker (runs then share the GPU)")
    st.add_argument("--limit", type=int, default=1, help="flow runs at once per worker")
    for action, text in [("stop", "stop the workers this script started"),
                         ("status", "list the recorded workers; exit 1 if one is down")]:
        sp = sub.add_parser(action, parents=[common], help=text)
        sp.add_argument("--pool", help="only this pool's workers (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = stack_dir(args.state_dir)
    try:
        if args.action == "start":
            env = dict(os.environ)
            env_file = root / "env"
            if env_file.is_file():
                env.update(read_env_file(env_file))
                print(f"using the stack settings in {env_file}")
            workers = plan(args.pool, [] if args.cpu_slots else detect_gpus(),
                           cpu_slots=args.cpu_slots, only=args.gpus, share_gpu=args.share_gpu,
                           limit=args.limit, prefect=tool("prefect"))
            for line in start_workers(root, workers, env) or ["all already running"]:
                print(line)
            print(f"logs: {root / 'logs'}")
            print(f"{pool_limit(workers)} run(s) at once here; cap the pool at the sum over all "
                  f"its machines: prefect work-pool set-concurrency-limit {args.pool} <sum>")
            return 0
        if args.action == "stop":
            for line in stop_workers(root, args.pool):
                print(line)
            return 0
        info = Supervisor(root).info()
        names = worker_names(info, args.pool)
        for name in names:
            alive = info[name]["statename"] == "RUNNING"
            print(f"{name:<32} pid {info[name]['pid']:<8} {'alive' if alive else 'down'}")
        if not names:
            print(f"no workers supervised under {root}")
        return 0 if names and all(info[n]["statename"] == "RUNNING" for n in names) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
