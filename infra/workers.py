"""Prefect process workers for this machine: one per GPU, each pinned to its GPU.

    python infra/workers.py start --pool gpu [--gpus 0,1] [--state-dir DIR]
    python infra/workers.py start --pool gpu --cpu-slots 2      # no GPU: N CPU slots
    python infra/workers.py start --pool gpu --share-gpu --limit 2
    python infra/workers.py stop [--pool gpu] [--state-dir DIR]
    python infra/workers.py status [--pool gpu] [--state-dir DIR]

GPUs come from `nvidia-smi -L` (none when it is missing or fails). Each GPU gets one
`prefect worker start --type process --limit 1` with CUDA_VISIBLE_DEVICES=<index>, so a
worker takes one flow run at a time and two runs never share a GPU; `--share-gpu` allows
`--limit` above 1. `--cpu-slots N` starts N workers with no GPU visible instead (a
machine without GPUs, tests). The workers poll the Prefect API named by PREFECT_API_URL;
if `<state>/stack/env` exists (written by `infra/stack.py up`) its settings are used.

Every worker runs in its own session (process group), logs to
`<state>/stack/logs/worker.<pool>.<name>.log` and records its pid in
`<state>/stack/pids/worker.<pool>.<name>.pid`, with the command line and start time beside
it in a `.json` file, so that `stop` signals only processes this script started.

Standard library only. The process helpers below are shared with `infra/stack.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
CPU_POOL_LIMIT = 4  # flow runs at once on a worker of a pool without GPUs


class StackError(RuntimeError):
    """Something the user can fix: the message says what and where to look."""


# ------------------------------------------------------------------------ locations


def stack_dir(state_dir: str | os.PathLike | None = None) -> Path:
    """`<state>/stack`, where state is --state-dir, else $CIFAR_STATE_DIR, else ./.pipeline."""
    state = state_dir or os.environ.get("CIFAR_STATE_DIR") or ".pipeline"
    return Path(state).expanduser().resolve() / "stack"


def tool(name: str) -> str:
    """A console script of this virtualenv (beside the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    import shutil

    found = shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` is not installed next to {sys.executable} nor on PATH; "
                         "install the project with `pip install -e '.[dev]'`")
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a file of `export NAME=value` lines (as stack.py writes them)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        if words and words[0] == "export":
            words = words[1:]
        for word in words:
            name, sep, value = word.partition("=")
            if sep:
                env[name] = value
    return env


# ------------------------------------------------------------------------ processes


def _proc_stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, ppid, pgid, session, start time in clock ticks) of a live pid, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _running(pid: int, start_time: int | None = None) -> bool:
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start_time is None or stat[4] == start_time


def matches(record: Mapping, pid: int | None = None) -> bool:
    """Is the process `record` describes still the one that was started?

    The pid alone is not enough (pids are reused): the process must also have the
    recorded start time and a command line ending with the recorded arguments (the
    interpreter in front of a console script may differ from argv[0])."""
    pid = record.get("pid") if pid is None else pid
    if not isinstance(pid, int) or pid <= 0 or not _running(pid, record.get("start_time")):
        return False
    tail = list(record.get("argv", []))[1:]
    return bool(tail) and cmdline(pid)[-len(tail) :] == tail


@dataclass(frozen=True)
class Spec:
    """A process to run in the background: `name` names its pid and log files."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # the complete environment
    cwd: str | None = None


def pid_path(root: Path, name: str) -> Path:
    return root / "pids" / f"{name}.pid"


def log_path(root: Path, name: str) -> Path:
    return root / "logs" / f"{name}.log"


def read_record(root: Path, name: str) -> dict | None:
    """What `spawn` recorded about `name`, or None if nothing (valid) was."""
    meta = pid_path(root, name).with_suffix(".json")
    try:
        record = json.loads(meta.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def records(root: Path, prefix: str = "") -> dict[str, dict]:
    out = {}
    for meta in sorted((root / "pids").glob(f"{prefix}*.json")):
        record = read_record(root, meta.stem)
        if record is not None:
            out[meta.stem] = record
    return out


def _write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def spawn(root: Path, spec: Spec) -> subprocess.Popen:
    """Start `spec` in a session of its own, output appended to its log, pid recorded."""
    log = log_path(root, spec.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"\n=== {stamp} starting: {shlex.join(spec.argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            spec.argv, env=spec.env, cwd=spec.cwd, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
    # exec() lets Popen return a moment before the kernel sets the new command line.
    deadline = time.monotonic() + 5
    while not cmdline(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    stat = _proc_stat(proc.pid)
    record = {"pid": proc.pid, "argv": spec.argv, "start_time": stat[4] if stat else None,
              "log": str(log), "started_at": time.time()}
    _write_atomically(pid_path(root, spec.name).with_suffix(".json"), json.dumps(record))
    _write_atomically(pid_path(root, spec.name), f"{proc.pid}\n")
    return proc


def running(root: Path, name: str) -> dict | None:
    """The record of `name` if its process is alive and is the one recorded."""
    record = read_record(root, name)
    return record if record is not None and matches(record) else None


def _process_table() -> dict[int, tuple[str, int, int, int, int]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def family(pid: int, *, leader_alive: bool) -> dict[int, int]:
    """{pid: start time} of everything `pid` started: its session, its process group,
    and its descendants (flow runs start their own sessions, so the session alone
    misses them). Without a live leader, only the members of its session or group:
    Linux reuses no pid while a session or group of that id exists, so those are the
    leader's orphans, not strangers."""
    table = {p: s for p, s in _process_table().items() if s[0] not in ("Z", "X")}
    members = {p for p, s in table.items() if s[3] == pid or s[2] == pid}
    if leader_alive:
        members.add(pid)
    children: dict[int, list[int]] = {}
    for p, s in table.items():
        children.setdefault(s[1], []).append(p)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in members:
                members.add(child)
                todo.append(child)
    return {p: table[p][4] for p in members if p in table}


def _signal_all(procs: Mapping[int, int], sig: int) -> None:
    for p, start in procs.items():
        if _running(p, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)


def stop(root: Path, name: str, timeout: float = STOP_TIMEOUT) -> str:
    """Stop what `spawn` started as `name` (SIGTERM, then SIGKILL after `timeout`) and
    remove its pid files. Returns one line saying what happened."""
    record = read_record(root, name)
    pid_file = pid_path(root, name)
    if record is None:
        pid_file.unlink(missing_ok=True)
        return f"{name}: no record"
    pid = record["pid"]
    if matches(record):
        procs = family(pid, leader_alive=True)
    elif _running(pid):
        # The pid now belongs to some other program: not ours to signal.
        procs = {}
    else:
        procs = family(pid, leader_alive=False)
    if procs:
        _signal_all(procs, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_running(p, s) for p, s in procs.items()):
            time.sleep(0.1)
        # Whatever appeared in the meantime (a flow run's children) goes too.
        if matches(record):
            procs = {**procs, **family(pid, leader_alive=True)}
        survivors = {p: s for p, s in procs.items() if _running(p, s)}
        _signal_all(survivors, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_running(p, s) for p, s in survivors.items()):
            time.sleep(0.05)
        how = f"killed {len(survivors)} after {timeout:.0f} s" if survivors else "terminated"
        what = f"{name}: stopped pid {pid} and {len(procs) - 1} more ({how})"
    elif _running(pid):
        what = f"{name}: pid {pid} is now another program; left it alone"
    else:
        what = f"{name}: was not running"
    pid_file.with_suffix(".json").unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)
    return what


# ---------------------------------------------------------------------------- GPUs

_GPU_LINE = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: ([^)]+)\))?\s*$")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    uuid: str | None


def parse_gpus(text: str) -> list[Gpu]:
    """GPUs of `nvidia-smi -L` output; MIG instances (indented lines) are not counted."""
    gpus = []
    for line in text.splitlines():
        match = _GPU_LINE.match(line)
        if match:
            gpus.append(Gpu(int(match.group(1)), match.group(2), match.group(3)))
    return gpus


def detect_gpus(run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[Gpu]:
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


# ------------------------------------------------------------------------- workers


def host_name() -> str:
    """The short host name, reduced to characters safe in worker and file names."""
    name = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "host"


def worker_file_name(pool: str, worker: str) -> str:
    return f"worker.{pool}.{worker}"


QUERY_SECONDS = 2


def worker_argv(prefect: str, pool: str, name: str, limit: int) -> list[str]:
    return [prefect, "worker", "start", "--pool", pool, "--type", "process",
            "--name", name, "--limit", str(limit)]


@dataclass(frozen=True)
class Worker:
    name: str  # the worker's name in the pool, unique per pool
    pool: str
    gpu: int | None  # the GPU it may see; None: no GPU at all
    limit: int  # flow runs at once
    argv: list[str]

    @property
    def file_name(self) -> str:
        return worker_file_name(self.pool, self.name)

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        # How often an idle worker asks for work: a GPU that finishes a run starts the next
        # queued one within seconds instead of Prefect's default 10.
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", str(QUERY_SECONDS))
        if self.gpu is None:
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            # nvidia-smi numbers GPUs in PCI bus order; make CUDA count the same way.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        return env


def plan(
    pool: str,
    gpus: Sequence[Gpu],
    *,
    cpu_slots: int | None = None,
    only: Iterable[int] | None = None,
    share_gpu: bool = False,
    limit: int = 1,
    host: str | None = None,
    prefect: str = "prefect",
) -> list[Worker]:
    """The workers to run: one per GPU (or per GPU of `only`), or `cpu_slots` without one.

    Raises StackError when there is nothing to run or when `limit` > 1 would let two
    runs share a GPU without `share_gpu`."""
    host = host or host_name()
    if limit < 1:
        raise StackError(f"--limit must be at least 1, got {limit}")
    if cpu_slots is not None:
        if cpu_slots < 1:
            raise StackError(f"--cpu-slots must be at least 1, got {cpu_slots}")
        names = [f"{host}-cpu{i}" for i in range(cpu_slots)]
        return [Worker(n, pool, None, limit, worker_argv(prefect, pool, n, limit))
                for n in names]
    if not gpus:
        raise StackError("no GPU found by `nvidia-smi -L`; pass --cpu-slots N to start N "
                         "workers without a GPU instead")
    if limit > 1 and not share_gpu:
        raise StackError(f"--limit {limit} would run {limit} flow runs on one GPU; "
                         "pass --share-gpu if that is what you want")
    indices = [g.index for g in gpus]
    chosen = list(indices) if only is None else list(only)
    unknown = [i for i in chosen if i not in indices]
    if unknown:
        raise StackError(f"GPU(s) {unknown} not found; `nvidia-smi -L` lists {indices}")
    if not chosen:
        raise StackError("no GPU chosen; name at least one in --gpus")
    return [Worker(f"{host}-gpu{i}", pool, i, limit,
                   worker_argv(prefect, pool, f"{host}-gpu{i}", limit))
            for i in dict.fromkeys(chosen)]


def start_workers(root: Path, workers: Sequence[Worker], env: Mapping[str, str],
                  cwd: str | None = None) -> list[tuple[Worker, int, bool]]:
    """Start each worker that is not already running. Returns (worker, pid, started)."""
    if not env.get("PREFECT_API_URL"):
        # Without it each worker would start an in-process server of its own.
        raise StackError("PREFECT_API_URL is not set: point it at the Prefect server "
                         "(`infra/stack.py up` writes <state>/stack/env)")
    out = []
    for worker in workers:
        record = running(root, worker.file_name)
        if record is not None and record.get("argv") == worker.argv:
            out.append((worker, record["pid"], False))
            continue
        if record is not None:  # the same worker with other settings: replace it
            stop(root, worker.file_name)
        spec = Spec(worker.file_name, worker.argv, worker.environment(env), cwd)
        out.append((worker, spawn(root, spec).pid, True))
    return out


def worker_records(root: Path, pool: str | None = None) -> dict[str, dict]:
    return records(root, worker_file_name(pool, "") if pool else "worker.")


def stop_workers(root: Path, pool: str | None = None, keep: Iterable[str] = ()) -> list[str]:
    """Stop the recorded workers (of `pool`, if given) whose file names are not in `keep`."""
    keep = set(keep)
    names = [n for n in worker_records(root, pool) if n not in keep]
    # Signal them all first, so their stop timeouts overlap rather than add up.
    return _stop_many(root, names)


def _stop_many(root: Path, names: Sequence[str]) -> list[str]:
    if len(names) <= 1:
        return [stop(root, n) for n in names]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda n: stop(root, n), names))


def worker_status(root: Path, pool: str | None = None) -> list[tuple[str, int, bool]]:
    """(file name, pid, alive) of each recorded worker."""
    return [(name, record["pid"], matches(record))
            for name, record in worker_records(root, pool).items()]


# ----------------------------------------------------------------------------- CLI


def _parse_gpus(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus takes indices like 0,1; got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infra/workers.py",
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
            for worker, pid, started in start_workers(root, workers, env):
                state = "started" if started else "already running"
                gpu = "no GPU" if worker.gpu is None else f"GPU {worker.gpu}"
                print(f"{worker.name:<24} pool {worker.pool:<6} {gpu:<8} pid {pid:<8} {state}")
            print(f"logs: {root / 'logs'}")
            return 0
        if args.action == "stop":
            for line in stop_workers(root, args.pool):
                print(line)
            return 0
        rows = worker_status(root, args.pool)
        for name, pid, alive in rows:
            print(f"{name:<32} pid {pid:<8} {'alive' if alive else 'down'}")
        if not rows:
            print(f"no workers recorded under {root / 'pids'}")
        return 0 if rows and all(alive for _, _, alive in rows) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
