"""The stack's processes, run by supervisord (the `supervisor` package): one per state
directory, configured in `<state>/stack/supervisor/`, each program logging to
`<state>/stack/logs/<name>.log` and restarted when it exits.

The project's own part: which programs to run (one file each, so that supervisord's
`reloadConfig` tells what changed) and reading their state. Processes are stopped by the
project's one process stopper, `flows.interrupts.stop_processes` (psutil). Flow runs start
sessions of their own, and a supervisord killed with SIGKILL leaves its programs running:
every program's environment carries `CIFAR_STACK=<state>/stack`, which finds them all.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from flows.interrupts import stop_processes  # the one process stopper
from model.fileio import atomic_write

STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
START_SECONDS = 5  # a program must stay up this long to count as started
START_RETRIES = 5  # quick deaths in a row before a program is left FATAL
STACK_ENV = "CIFAR_STACK"  # in every program's environment: <state>/stack
PROGRAM_ENV = "CIFAR_STACK_PROGRAM"  # ... and the program's name


class StackError(RuntimeError):
    """Something the user can fix: the message says what and where to look."""


def stack_dir(state_dir: str | os.PathLike | None = None) -> Path:
    """`<state>/stack`, where state is --state-dir, else $CIFAR_STATE_DIR, else ./.pipeline."""
    state = state_dir or os.environ.get("CIFAR_STATE_DIR") or ".pipeline"
    return Path(state).expanduser().resolve() / "stack"


def tool(name: str) -> str:
    """A console script of this virtualenv (beside the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` is not installed next to {sys.executable} nor on PATH; "
                         "install the project with `pip install -e '.[dev]'`")
    return found


def write_text(path: Path, text: str, mode: int = 0o666) -> None:
    """`text` to `path` atomically; `mode` 0o600 for what holds credentials."""
    with atomic_write(path, mode, text=True) as f:
        f.write(text)


def log_path(root: Path, name: str) -> Path:
    return root / "logs" / f"{name}.log"


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def render_env_file(env: Mapping[str, str]) -> str:
    lines = ["# The local stack's settings: `source` this file to use it. Written by "
             "python -m infra.stack up."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    return "\n".join(lines) + "\n"


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of `export NAME=value` lines, as `render_env_file` writes them."""
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        for word in words[1:] if words[:1] == ["export"] else words:
            name, sep, value = word.partition("=")
            if sep:
                env[name] = value
    return env


def stack_processes(root: Path, program: str | None = None) -> list[psutil.Process]:
    """Every live process of this stack: those whose environment names `root` (programs,
    what they started, flow runs), but not this process; of `program` alone if given."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            env = p.environ() if p.pid != os.getpid() else {}
            if env.get(STACK_ENV) == str(root) and program in (None, env.get(PROGRAM_ENV)):
                found.append(p)
    return found


def port_holders(port: int) -> str:
    """`pid N (name)` of each process listening on `port`, as far as this user may see."""
    with contextlib.suppress(psutil.Error):
        pids = {c.pid for c in psutil.net_connections("tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid}
        return ", ".join(f"pid {pid} ({psutil.Process(pid).name()})" for pid in sorted(pids))
    return ""


# ------------------------------------------------------------------------ supervisord


@dataclass(frozen=True)
class Program:
    """A process supervisord keeps running; `name` names its log file too."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # the complete environment
    cwd: str | None = None
    user: str | None = None  # run as this user (supervisord must be root)
    stop_signal: str = "TERM"
    # Stop what an earlier run left behind before starting: a server killed with SIGKILL
    # leaves its worker processes holding its port.
    fresh: bool = False

    def section(self, root: Path) -> str:
        env = {**self.env, STACK_ENV: str(root), PROGRAM_ENV: self.name}
        argv = self.argv
        if self.fresh:
            argv = [sys.executable, "-m", "infra.procs", "exec", "--", *argv]
        # supervisord expands %(...)s in values: a literal % is written %%.
        quote = lambda v: '"' + v.replace("%", "%%").replace('"', '\\"') + '"'  # noqa: E731
        lines = [
            f"[program:{self.name}]",
            "command=" + " ".join(shlex.quote(a).replace("%", "%%") for a in argv),
            "environment=" + ",".join(f"{k}={quote(v)}" for k, v in sorted(env.items())),
            f"directory={self.cwd or root}",
            "autostart=true",
            "autorestart=true",
            f"startsecs={START_SECONDS}",
            f"startretries={START_RETRIES}",
            f"stopsignal={self.stop_signal}",
            f"stopwaitsecs={STOP_TIMEOUT:.0f}",
            "stopasgroup=true",
            "killasgroup=true",
            "umask=077",  # databases, objects and logs: their owner's alone
            "redirect_stderr=true",
            f"stdout_logfile={log_path(root, self.name)}",
        ]
        if self.user:
            lines.append(f"user={self.user}")
        return "\n".join(lines) + "\n"


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class Supervisor:
    """The state directory's supervisord: its programs, started, changed and stopped."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "supervisor"
        self.socket = self.home / "supervisor.sock"
        self.programs_dir = self.home / "programs"
        self.log = root / "logs" / "supervisord.log"

    def _rpc(self):
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(serverurl=f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def running(self) -> bool:
        try:
            return self._rpc().getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def start(self) -> None:
        """supervisord, unless it runs already. Processes an earlier one left behind (it
        was killed, say) are stopped first: they hold the ports and data directories."""
        if self.running():
            return
        if len(str(self.socket)) > 100:  # AF_UNIX paths end at 107 bytes
            raise StackError(f"the state directory's path is too long for supervisord's "
                             f"socket ({self.socket}); choose a shorter --state-dir")
        leftovers = stack_processes(self.root)
        if leftovers:
            killed = stop_processes(leftovers, STOP_TIMEOUT)
            print(f"  stopped {len(leftovers)} process(es) an earlier supervisord left "
                  f"({killed} killed)")
        for folder in (self.home, self.programs_dir, self.log.parent):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        conf = self.home / "supervisord.conf"
        write_text(conf, "\n".join([
            "[unix_http_server]", f"file={self.socket}", "chmod=0700", "",
            "[supervisord]", f"logfile={self.log}", f"pidfile={self.home / 'supervisord.pid'}",
            f"directory={self.root}", f"childlogdir={self.root / 'logs'}", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "", "[include]", f"files={self.programs_dir}/*.conf", "",
        ]))
        # Programs get complete environments of their own; supervisord's would leak into
        # them (another stack's PREFECT_API_URL, say), so it gets almost none.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), STACK_ENV: str(self.root),
               **{k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}}
        # supervisord daemonizes: it is in a session of its own once this returns.
        result = subprocess.run([tool("supervisord"), "-c", str(conf)], env=env,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=30)
        deadline = time.monotonic() + 15
        while not self.running():
            if time.monotonic() > deadline or result.returncode != 0:
                raise StackError(f"supervisord did not start ({result.returncode}): "
                                 f"{result.stderr.strip() or 'no output'}; see {self.log}")
            time.sleep(0.2)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError, xmlrpc.client.Error):
            self._rpc().shutdown()
        deadline = time.monotonic() + 5
        while self.socket.exists() and self.running() and time.monotonic() < deadline:
            time.sleep(0.1)

    def programs(self) -> list[str]:
        return sorted(p.stem for p in self.programs_dir.glob("*.conf"))

    def apply(self, programs: Sequence[Program]) -> list[str]:
        """Run `programs`: new ones started, changed ones restarted, unchanged ones left
        alone (and any whose file went away stopped). Returns what changed."""
        for program in programs:
            if not _NAME.match(program.name):
                raise ValueError(f"program name {program.name!r}: letters, digits, _ . - only")
            write_text(self.programs_dir / f"{program.name}.conf", program.section(self.root),
                       mode=0o600)  # environments hold the stack's credentials
        rpc = self._rpc()
        [[added, changed, removed]] = rpc.reloadConfig()
        for name in changed + removed:
            self._stop(rpc, name)
            rpc.removeProcessGroup(name)
        for name in changed + added:
            rpc.addProcessGroup(name)
        return [f"{n}: started" for n in added] + [f"{n}: restarted (changed)" for n in changed] \
            + [f"{n}: stopped" for n in removed]

    def _stop(self, rpc, name: str) -> None:
        """Stop a program and whatever it started in sessions of its own (flow runs)."""
        try:
            pid = rpc.getProcessInfo(name)["pid"]
            family = psutil.Process(pid).children(recursive=True) if pid else []
        except (psutil.Error, xmlrpc.client.Fault):
            family = []
        with contextlib.suppress(xmlrpc.client.Fault):  # NOT_RUNNING
            rpc.stopProcess(name)
        stop_processes((p for p in family if p.is_running()), STOP_TIMEOUT)

    def stop(self, names: Iterable[str]) -> None:
        """Stop and drop these programs (workers first, then servers, as given)."""
        rpc = self._rpc()
        for name in names:
            self._stop(rpc, name)
            with contextlib.suppress(xmlrpc.client.Fault):
                rpc.removeProcessGroup(name)
            (self.programs_dir / f"{name}.conf").unlink(missing_ok=True)

    def info(self) -> dict[str, dict]:
        """{name: supervisord's process info} (statename, pid, exitstatus, description)."""
        if not self.running():
            return {}
        return {p["name"]: p for p in self._rpc().getAllProcessInfo()}

    def wait_running(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            state = self.info().get(name, {})
            if state.get("statename") == "RUNNING" or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def restarts(self) -> dict[str, tuple[int, str]]:
        """{program: (unexpected exits, the last one's time and status)} since supervisord
        started, from its log."""
        found: dict[str, tuple[int, str]] = {}
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return found
        for line in text.split("supervisord started with pid")[-1].splitlines():
            match = re.search(r"exited: (\S+) \((.*); not expected\)", line)
            if match:
                count, _ = found.get(match.group(1), (0, ""))
                found[match.group(1)] = (count + 1, f"{line[:19]} {match.group(2)}")
        return found


def exec_fresh(argv: Sequence[str]) -> None:
    """Stop the leftovers of this program's earlier runs, then become `argv`."""
    name = os.environ[PROGRAM_ENV]
    stale = stack_processes(Path(os.environ[STACK_ENV]), name)
    if stale:
        print(f"stopping {len(stale)} process(es) an earlier {name} left", flush=True)
        stop_processes(stale, STOP_TIMEOUT)
    os.execvp(argv[0], list(argv))


if __name__ == "__main__":  # supervisord runs `-m infra.procs exec -- ARGV` for fresh programs
    if sys.argv[1:3] != ["exec", "--"] or len(sys.argv) < 4:
        sys.exit("usage: python -m infra.procs exec -- COMMAND [ARG...]")
    exec_fresh(sys.argv[3:])
