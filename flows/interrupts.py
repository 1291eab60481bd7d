"""Ctrl-C and SIGTERM for the command line: stop within seconds, leave nothing running.

A terminal's Ctrl-C signals the whole foreground process group; SIGTERM (a scheduler, a
`kill`) only the command. Either way the command records why its runs ended (the Prefect
flow run Crashed, its MLflow runs Killed), stops the processes it started and says in one
line how to resume.

- The signal raises `Interrupted` in the main thread (while a flow runs, Prefect takes
  SIGTERM first, raises its TerminationSignal, and passes the signal on once the flow run
  has ended). The flow, interrupted while waiting for its jobs, tells them to stop; they
  end at their next batch, and the engines and `tracked_run` record Crashed and Killed.
- If that has not finished within the grace period, or a second signal comes, the command
  records the same states itself, stops its children and exits.
- The embedded Prefect server is a child in a session of its own, so that Ctrl-C does not
  stop it before the flow run's end is recorded there; it is stopped at exit, after
  Prefect's last logs, and dies with the command however that ends.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

from model.errors import UserError

PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the command."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class InterruptGuard:
    """While active in the main thread, the first SIGINT or SIGTERM raises `Interrupted`;
    `interrupted()` then stops the children and prints the line. With `owns_process`, a
    second signal, or `grace` seconds without an exit, forces one (`os._exit`)."""

    def __init__(self, describe: Callable[[InterruptGuard], str], *, owns_process: bool,
                 grace: float | None = None, keep_pids: Callable[[], set[int]] = set):
        self.describe = describe
        self.owns_process = owns_process
        self.grace = grace if grace is not None else float(
            os.environ.get("CIFAR_INTERRUPT_GRACE_SECONDS") or 10)
        self.keep_pids = keep_pids  # children stopped at exit (the Prefect server)
        self.signum: int | None = None
        self.flow_run: tuple[str, str] | None = None  # (id, name) when the signal came
        self._reported = False
        self._forcing = threading.Lock()
        self._previous: dict[int, object] = {}
        self._baseline: set[int] = set()

    def __enter__(self) -> InterruptGuard:
        self._baseline = {p.pid for p in _descendants()}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        if self.owns_process:
            # Registered first, so it runs last: after an interrupt, once the other exit
            # hooks have run (Prefect's last logs, the server's stop), the interpreter's
            # teardown only frees memory, which takes seconds with torch loaded.
            atexit.register(self._exit_now)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            self.flow_run = _current_flow_run()
            if self.owns_process:
                # Also covers the interpreter's exit: a hung atexit handler is cut short.
                threading.Thread(target=self._force, args=(self.grace,),
                                 name="interrupt-watchdog", daemon=True).start()
            raise Interrupted(signum)
        if self.owns_process:
            self._force()
        # In a caller's process the first interrupt is unwinding already.

    def interrupted(self, exc: BaseException | None = None) -> int:
        """After the interrupt unwound the command: stop what it started, say what
        happened; the exit status (128 + the signal's number)."""
        if self.signum is None:  # a KeyboardInterrupt this guard did not raise
            self.signum = getattr(exc, "signum", signal.SIGINT)
        stop_processes(self._new_children(exclude=self.keep_pids()))
        self._report()
        return 128 + self.signum

    def _exit_now(self) -> None:
        if self.signum is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + self.signum)

    def _force(self, after: float = 0.0) -> None:
        time.sleep(after)
        if not self._forcing.acquire(blocking=False):
            return
        if not self._reported:  # else the engines have recorded them, and Prefect's
            recording = threading.Thread(target=self._record_states, daemon=True)
            recording.start()  # server may be gone already
            recording.join(5)
        stop_processes(self._new_children(), timeout=2)
        self._report()
        os._exit(128 + (self.signum or signal.SIGINT))

    def _report(self) -> None:
        if not self._reported:
            self._reported = True
            print(self.describe(self), file=sys.stderr, flush=True)

    def _new_children(self, exclude: set[int] = frozenset()) -> list[psutil.Process]:
        return [p for p in _descendants() if p.pid not in self._baseline | exclude]

    def _record_states(self) -> None:
        """What the engines would have recorded, had the command unwound in time."""
        try:
            if "tasks.tracking" in sys.modules:
                from tasks.tracking import end_open_runs

                end_open_runs("KILLED")
            if self.flow_run is not None:
                from prefect import get_client
                from prefect.states import Crashed

                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(self.flow_run[0]).state
                    if state is None or not state.is_final():
                        name = signal.Signals(self.signum or signal.SIGINT).name
                        client.set_flow_run_state(
                            self.flow_run[0], Crashed(message=f"interrupted by {name}"),
                            force=True)
        except Exception as exc:
            print(f"warning: could not record the interruption: {exc}", file=sys.stderr)


def resume_command(argv: list[str] | None, state: Path, run_key: str) -> str:
    """The command line that continues this one's run: the same words, plus the state
    directory and the run key if they were not given."""
    words = list(sys.argv[1:] if argv is None else argv)
    if not any(w == "--state-dir" or w.startswith("--state-dir=") for w in words):
        words[:0] = ["--state-dir", str(state)]
    if not any(w == "--run-key" or w.startswith("--run-key=") for w in words):
        words += ["--run-key", run_key]
    return shlex.join(["cifar-pipeline", *words])


def interrupted_line(guard: InterruptGuard, command: str, resume: str | None) -> str:
    line = f"interrupted by {signal.Signals(guard.signum).name}: `{command}` stopped"
    if guard.flow_run is not None:
        line += f" during Prefect flow run {guard.flow_run[1]!r}"
    if resume:
        return f"{line}; resume from its last checkpoint with: {resume}"
    return f"{line}; run the same command again to start over"


def _current_flow_run() -> tuple[str, str] | None:
    """The Prefect flow run the main thread is in, if any (signal handlers run there)."""
    context = sys.modules.get("prefect.context")
    run = getattr(context.FlowRunContext.get(), "flow_run", None) if context else None
    return (str(run.id), run.name) if run is not None else None


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def stop_processes(processes: Iterable[psutil.Process], timeout: float = 3.0) -> int:
    """SIGTERM, then SIGKILL whatever is left after `timeout` seconds; how many were
    killed. The one process stopper: the local stack (infra/procs.py) uses it too."""
    processes = list(processes)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=1)
    return len(alive)


# ------------------------------------------------------------------ the embedded server


def start_prefect_server(state: Path) -> psutil.Popen:
    """`prefect server start` on a free local port, for this command's flows: Prefect is
    pointed at it (before it is imported), and it is stopped at exit. While it creates a
    fresh database, a lock in `state` is held, so that two first runs do not race on its
    schema. Call from the main thread: the parent-death signal follows the forking thread."""
    from tasks.settings import file_lock

    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"  # its errors: in the state directory, not on the terminal
    database = home / "prefect.db"
    fresh = not database.exists() or database.stat().st_size == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    lock = file_lock(state / ".prefect-db.lock") if fresh else contextlib.nullcontext()
    with lock, open(log, "ab") as errors:
        server = psutil.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "ERROR", "--no-ui"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
            start_new_session=True, preexec_fn=_die_with(os.getpid()))
        # Registered before Prefect is imported, so it runs after Prefect's own exit hooks.
        atexit.register(stop_processes, [server])
        _wait_until_healthy(server, url, float(
            os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 120), log)
    os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_UI_URL", "")  # no links to pages gone after the command
    return server


def _die_with(parent: int) -> Callable[[], None]:
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:  # in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _wait_until_healthy(server: psutil.Popen, url: str, timeout: float, log: Path) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # it is local
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), direct.open(f"{url}/health", timeout=2):
            return
        time.sleep(0.1)
    why = (f"exited with status {server.returncode}" if server.poll() is not None
           else f"did not answer within {timeout:.0f} s")
    stop_processes([server])
    from tasks.settings import StateDirError, disk_error_message

    text = log.read_text(errors="replace") if log.is_file() else ""
    last = next((li for li in reversed(text.splitlines()) if "Error" in li), "(nothing)")
    # The disk filled up after the free-space check (the log itself may have found none).
    if "disk is full" in last or "No space left" in last or shutil.disk_usage(log).free < 2**20:
        full = disk_error_message(OSError(errno.ENOSPC, "full"), log.parent.parent)
        raise StateDirError(f"cannot use the state directory: {full}")
    raise UserError(f"the Prefect server for this command {why}; its log {log} says: "
                    f"{last}")
