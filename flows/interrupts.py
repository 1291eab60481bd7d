"""Ctrl-C and SIGTERM for the command line: stop within seconds, leave nothing running.

A terminal's Ctrl-C signals the whole foreground process group; SIGTERM (a scheduler, a
`kill`) only the command. Either way the command records why its runs ended (the Prefect
flow run Crashed, its MLflow runs Killed), stops the processes it started (the embedded
Prefect server, DataLoader workers) and says in one line how to resume.

- The embedded Prefect server runs in a session of its own, so that Ctrl-C does not kill
  it before the end of the flow run is recorded there; it still dies with the command
  (PR_SET_PDEATHSIG), however the command ends.
- The first signal raises `Interrupted` in the main thread and in the threads running
  the flow's tasks: the flow and task engines record Crashed and `tracked_run` records
  Killed, as they do for any exception.
- If that has not finished within the grace period, or a second signal comes, the command
  records the same states itself, stops its children and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

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
                 grace: float | None = None, keep_pids: Callable[[], set[int]] = set,
                 on_exit: Callable[[], None] = lambda: None):
        self.describe = describe
        self.owns_process = owns_process
        self.grace = grace if grace is not None else float(
            os.environ.get("CIFAR_INTERRUPT_GRACE_SECONDS") or 10)
        self.keep_pids = keep_pids  # children to leave to atexit (the Prefect server)
        self.on_exit = on_exit  # what the caller would do on its way out
        self.signum: int | None = None
        self.flow_run: tuple[str, str] | None = None  # (id, name) when the signal came
        self._reported = False
        self._forcing = threading.Lock()
        self._previous: dict[int, object] = {}
        self._baseline: set[int] = set()
        self._workers: list[threading.Thread] = []
        self._prefect_bridge: Callable | None = None
        self._redelivery = False

    def __enter__(self) -> InterruptGuard:
        self._baseline = {p.pid for p in _descendants()}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def hear_prefect_sigterm(self) -> None:
        """While a flow runs, Prefect's engine takes SIGTERM for itself (and, with a task
        in a worker thread, waits for that task to finish): hear it first."""
        from prefect.utilities import engine

        bridge = getattr(engine, "_prefect_sigterm_handler", None)  # Prefect 3's name
        if self._previous and self._prefect_bridge is None and bridge is not None:
            self._prefect_bridge = bridge
            engine._prefect_sigterm_handler = self._prefect_sigterm

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._prefect_bridge is not None:
            from prefect.utilities import engine

            engine._prefect_sigterm_handler = self._prefect_bridge

    def _handle(self, signum: int, frame: object) -> None:
        if self._redelivery:
            # Prefect sends the SIGTERM it took again, to this handler, once its flow
            # run has ended: the same interrupt, still unwinding.
            self._redelivery = False
            raise Interrupted(signum)
        if self._first(signum):
            raise Interrupted(signum)

    def _prefect_sigterm(self, signum: int, frame: object) -> None:
        self._redelivery = self._first(signum)
        self._prefect_bridge(signum, frame)  # raises Prefect's TerminationSignal

    def _first(self, signum: int) -> bool:
        """Note the interrupt and pass it to the task threads; False for a second one."""
        if self.signum is not None:
            if self.owns_process:
                self._force()
            return False  # in a caller's process: the first interrupt is unwinding already
        self.signum = signum
        self.flow_run = _current_flow_run()
        if self.owns_process:
            # Also covers the interpreter's exit: a hung atexit handler is cut short too.
            threading.Thread(target=self._watchdog, name="interrupt-watchdog",
                             daemon=True).start()
        # A task runner trains in its own threads while this one waits for them: they
        # get the interrupt too, and end their runs as this thread ends the flow's.
        self._workers = _threads_running_project_code()
        for thread in self._workers:
            _raise_in_thread(thread, signum)
        return True

    def interrupted(self, exc: BaseException | None = None) -> int:
        """After the interrupt unwound the command: stop what it started, say what
        happened; the exit status (128 + the signal's number)."""
        if self.signum is None:  # a KeyboardInterrupt this guard did not raise
            self.signum = getattr(exc, "signum", signal.SIGINT)
        deadline = time.monotonic() + self.grace / 2
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        if "tasks.tracking" in sys.modules:  # what a thread still stuck could not end
            from tasks.tracking import end_open_runs

            end_open_runs("KILLED")
        stop_processes(self._new_children(exclude=self.keep_pids()))
        self._report()
        code = 128 + self.signum
        if self.owns_process:
            # Exit now. Prefect's log and event queues go to its server before atexit
            # stops that server (drained later, they would start a new one); what the
            # interpreter's own teardown would add is seconds of freeing torch's threads
            # and tensors, with nothing left to record.
            _drain_prefect_queues(timeout=3)
            self.on_exit()
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    def _watchdog(self) -> None:
        threading.Event().wait(self.grace)
        self._force()

    def _force(self) -> None:
        if not self._forcing.acquire(blocking=False):
            return
        if not self._reported:  # else the engines have recorded them, and Prefect's
            _bounded(self._record_states, timeout=5)  # server may be gone already
        stop_processes(self._new_children(), timeout=2)
        self._report()
        os._exit(128 + (self.signum or signal.SIGINT))

    def _report(self) -> None:
        if not self._reported:
            self._reported = True
            print(self.describe(self), file=sys.stderr, flush=True)

    def _new_children(self, exclude: set[int] = frozenset()) -> list:
        return [p for p in _descendants() if p.pid not in self._baseline | exclude]

    def _record_states(self) -> None:
        """What the engines would have recorded, had the command unwound in time."""
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


def resume_command(argv: list[str] | None, state: Path, run_key: str) -> str:
    """The command line that continues this one's run: the same words, plus the state
    directory and the run key if they were not given."""
    import shlex

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


def _threads_running_project_code() -> list[threading.Thread]:
    """Other non-daemon threads with a frame of this project on their stack: a task
    runner's workers inside a task. Daemon threads (metric senders, Prefect's services)
    are left alone: they end with the process."""
    root = str(Path(__file__).resolve().parents[1])
    ours = tuple(os.path.join(root, package, "") for package in ("model", "tasks", "flows"))
    frames = sys._current_frames()
    found = []
    for thread in threading.enumerate():
        if thread.daemon or thread is threading.current_thread() or thread.ident is None:
            continue
        frame = frames.get(thread.ident)
        while frame is not None and not frame.f_code.co_filename.startswith(ours):
            frame = frame.f_back
        if frame is not None:
            found.append(thread)
    return found


def _raise_in_thread(thread: threading.Thread, signum: int) -> None:
    """Raise Interrupted in `thread` at its next Python instruction (a running C call,
    such as one convolution, finishes first)."""
    interrupted = type("Interrupted", (Interrupted,),
                       {"__init__": lambda self: Interrupted.__init__(self, signum)})
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                               ctypes.py_object(interrupted))


def _current_flow_run() -> tuple[str, str] | None:
    """The Prefect flow run the main thread is in, if any (signal handlers run there)."""
    context = sys.modules.get("prefect.context")
    run_context = context.FlowRunContext.get() if context else None
    if run_context is None or run_context.flow_run is None:
        return None
    return str(run_context.flow_run.id), run_context.flow_run.name


def _drain_prefect_queues(timeout: float) -> None:
    """Send Prefect's queued logs and events to its API, for at most `timeout` seconds."""
    if "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        _bounded(lambda worker=worker: worker.drain_all(timeout=timeout), timeout)


def _bounded(fn: Callable[[], None], timeout: float) -> None:
    """Run `fn` in a thread for at most `timeout` seconds; its failure is only logged."""
    def run() -> None:
        try:
            fn()
        except Exception as exc:
            print(f"warning: could not record the interruption: {exc}", file=sys.stderr)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def stop_processes(processes: list, timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after `timeout` seconds."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=1)


# ------------------------------------------------------------------ the embedded server


def install_embedded_prefect(state: Path):
    """Make the temporary Prefect API, which this process's flows start on first use,
    start in a session of its own and die with this process; while it creates a fresh
    database, hold a lock in `state`, so that two first runs do not race on its schema.
    Returns that server (not started), or None when a Prefect API is configured."""
    from prefect.server.api import server as server_module
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    from tasks.settings import file_lock

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    database = Path(PREFECT_HOME.value()) / "prefect.db"

    class _OwnSessionServer(server_module.SubprocessASGIServer):
        def start(self, timeout: int | None = None) -> None:
            fresh = not database.exists() or database.stat().st_size == 0
            with file_lock(state / ".prefect-db.lock") if fresh else contextlib.nullcontext():
                super().start(timeout)

        def _run_uvicorn_command(self):
            real = server_module.subprocess
            server_module.subprocess = _OwnSessionSubprocess(real)
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = real

    # The class keeps one instance per port, and `get_client()` asks it for the instance
    # without a port: from now on, that is this one.
    return _OwnSessionServer()


class _OwnSessionSubprocess:
    """The `subprocess` module, with a Popen that starts a session of its own whose
    leader dies with this process (when started from the main thread: the kernel's
    parent-death signal follows the thread that forked)."""

    def __init__(self, real):
        self._real = real
        preexec = None
        if threading.current_thread() is threading.main_thread():
            prctl = ctypes.CDLL(None, use_errno=True).prctl
            parent = os.getpid()

            def preexec() -> None:  # in the child, between fork and exec
                prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
                if os.getppid() != parent:  # the parent died before prctl took effect
                    os._exit(1)

        self.Popen = functools.partial(real.Popen, start_new_session=True,
                                       preexec_fn=preexec)

    def __getattr__(self, name: str):
        return getattr(self._real, name)
