"""Process supervision shared by `infra/stack.py` and `infra/workers.py`.

Every background process (a server, a worker) runs in a session of its own, logs to
`<state>/stack/logs/<name>.log` and has its pid in `<state>/stack/pids/<name>.pid`, with
its command line and start time beside it in `<name>.json`. `stop` signals only a process
that is still the one recorded (pid, start time and command line), and everything it
started, flow runs in their own sessions included.

Also here, because every script needs them: the state directory, the console scripts of
this virtualenv, and the env file `infra/stack.py up` writes. Standard library and
`model.fileio` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from model.fileio import atomic_write

STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL


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


def write_text(path: Path, text: str, mode: int = 0o666) -> None:
    """`text` to `path` atomically; `mode` 0o600 for what holds credentials."""
    with atomic_write(path, mode, text=True) as f:
        f.write(text)


# ------------------------------------------------------------------------- env file


def render_env_file(env: Mapping[str, str]) -> str:
    lines = ["# The local stack's settings: `source` this file to use it. Written by "
             "infra/stack.py up."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    return "\n".join(lines) + "\n"


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a file of `export NAME=value` lines, as `render_env_file` writes
    them (values shell-quoted)."""
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


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


# ------------------------------------------------------------------------ /proc


def proc_stat(pid: int) -> tuple[str, int, int, int, int] | None:
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


def alive(pid: int, start_time: int | None = None) -> bool:
    """Is `pid` a live process (and the one started at `start_time`, if given)?"""
    stat = proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start_time is None or stat[4] == start_time


def matches(record: Mapping, pid: int | None = None) -> bool:
    """Is the process `record` describes still the one that was started?

    The pid alone is not enough (pids are reused): the process must also have the
    recorded start time and a command line ending with the recorded arguments (the
    interpreter in front of a console script may differ from argv[0])."""
    pid = record.get("pid") if pid is None else pid
    if not isinstance(pid, int) or pid <= 0 or not alive(pid, record.get("start_time")):
        return False
    tail = list(record.get("argv", []))[1:]
    return bool(tail) and cmdline(pid)[-len(tail) :] == tail


def _process_table() -> dict[int, tuple[str, int, int, int, int]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
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


# ------------------------------------------------------------------ records, spawn


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


def running(root: Path, name: str) -> dict | None:
    """The record of `name` if its process is alive and is the one recorded."""
    record = read_record(root, name)
    return record if record is not None and matches(record) else None


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
    stat = proc_stat(proc.pid)
    record = {"pid": proc.pid, "argv": spec.argv, "start_time": stat[4] if stat else None,
              "log": str(log), "started_at": time.time()}
    # The record before the pid file: whoever sees the pid file can check the record.
    write_text(pid_path(root, spec.name).with_suffix(".json"), json.dumps(record))
    write_text(pid_path(root, spec.name), f"{proc.pid}\n")
    return proc


# -------------------------------------------------------------------------- stop


def _signal_all(procs: Mapping[int, int], sig: int) -> None:
    for p, start in procs.items():
        if alive(p, start):
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
    elif alive(pid):
        # The pid now belongs to some other program: not ours to signal.
        procs = {}
    else:
        procs = family(pid, leader_alive=False)
    if procs:
        _signal_all(procs, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p, s) for p, s in procs.items()):
            time.sleep(0.1)
        # Whatever appeared in the meantime (a flow run's children) goes too.
        if matches(record):
            procs = {**procs, **family(pid, leader_alive=True)}
        survivors = {p: s for p, s in procs.items() if alive(p, s)}
        _signal_all(survivors, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p, s) for p, s in survivors.items()):
            time.sleep(0.05)
        how = f"killed {len(survivors)} after {timeout:.0f} s" if survivors else "terminated"
        what = f"{name}: stopped pid {pid} and {len(procs) - 1} more ({how})"
    elif alive(pid):
        what = f"{name}: pid {pid} is now another program; left it alone"
    else:
        what = f"{name}: was not running"
    pid_file.with_suffix(".json").unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)
    return what


def stop_many(root: Path, names: Sequence[str]) -> list[str]:
    """`stop` each of `names`, all signalled at once so their timeouts overlap."""
    if len(names) <= 1:
        return [stop(root, n) for n in names]
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda n: stop(root, n), names))
