"""The local stack's PostgreSQL cluster: Debian's `postgresql` binaries, a data directory
under `<state>/stack/postgres`, listening on 127.0.0.1 only (no Unix socket), a superuser
`cifar` with the stack's generated password, and the databases `prefect` (with pg_trgm,
which Prefect's migrations need) and `mlflow`.

PostgreSQL refuses to run as root: when the stack runs as root, initdb and the server run
as the `postgres` user, which then owns the data directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from infra.procs import Program, StackError

if TYPE_CHECKING:
    from infra.services import Stack

SUPERUSER = "cifar"
DATABASES = {"prefect": ["pg_trgm"], "mlflow": []}
MAX_CONNECTIONS = 300  # Prefect's services and MLflow's workers each keep a pool


def data_dir(stack: Stack) -> Path:
    return stack.root / "postgres"


def url(stack: Stack, database: str, driver: str, password: str | None = None) -> str:
    """A SQLAlchemy URL of `database`; without `password` the driver reads PGPASSWORD."""
    secret = f":{password}" if password else ""
    return f"{driver}://{SUPERUSER}{secret}@127.0.0.1:{stack.ports['postgres']}/{database}"


def bin_dir() -> Path:
    """Where `initdb` and `postgres` are: Debian keeps them off PATH, one folder per major
    version (the newest is taken)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise StackError("PostgreSQL is not installed: the stack keeps Prefect and MLflow in it. "
                     "Run ./setup.sh (it installs Debian's postgresql), or "
                     "`apt-get install postgresql`")


def os_user() -> str | None:
    """The user the server runs as: `postgres` when this is root, else the current one."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("PostgreSQL refuses to run as root and there is no `postgres` "
                         "user to run it as: install Debian's postgresql package, which "
                         "creates it, or run the stack as an ordinary user") from None
    return "postgres"


def _run_as(user: str | None, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    if user:
        kwargs.update(user=user, group=pwd.getpwnam(user).pw_gid, extra_groups=[])
    return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          **kwargs)


def major_version(bindir: Path) -> str:
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                         text=True, check=True).stdout
    return re.search(r"(\d+)", out).group(1)


def prepare(stack: Stack, password: str) -> None:
    """Create the cluster if there is none; refuse one of another major version, and a
    lock file that another program's pid holds. Run before the server starts."""
    data, bindir, user = data_dir(stack), bin_dir(), os_user()
    version = major_version(bindir)
    # The server must reach its data directory through every folder above it.
    if user and _run_as(user, ["test", "-x", str(stack.root)]).returncode != 0:
        raise StackError(f"PostgreSQL runs as the `postgres` user (it refuses root), which "
                         f"cannot enter {stack.root}: give the folders above it search "
                         "permission (chmod o+x), or choose a --state-dir outside a private "
                         "home directory")
    marker = data / "PG_VERSION"
    if marker.is_file():
        found = marker.read_text().strip()
        if found != version:
            raise StackError(f"{data} holds a PostgreSQL {found} cluster and this machine "
                             f"runs PostgreSQL {version}: upgrade it with pg_upgrade, or "
                             f"install PostgreSQL {found}; `up` never deletes a database")
        _check_lock(data)
        return
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    if user:
        shutil.chown(data, user, pwd.getpwnam(user).pw_gid)
    with tempfile.NamedTemporaryFile("w", prefix="pg-pw-", delete=True) as pwfile:
        pwfile.write(password + "\n")
        pwfile.flush()
        if user:
            shutil.chown(pwfile.name, user)
        result = _run_as(user, [str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER,
                                f"--pwfile={pwfile.name}", "--auth=scram-sha-256",
                                "--encoding=UTF8", "--locale=C", "--no-instructions"],
                         timeout=300)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        if "No space left" in output:
            raise StackError(f"initdb ran out of disk space in {data}: free some space "
                             "(a new cluster takes about 40 MB) and run `up` again")
        raise StackError(f"initdb {data} failed ({result.returncode}): "
                         f"{output.splitlines()[-1] if output else 'no output'}")
    print(f"  postgres cluster created in {data} (PostgreSQL {version})")


def _check_lock(data: Path) -> None:
    """PostgreSQL removes a lock file whose pid is gone, but not one whose pid was reused
    by another program; say which file to remove."""
    lock = data / "postmaster.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
        pid = int(lock.read_text().splitlines()[0])
        try:
            name = psutil.Process(pid).name()
        except psutil.NoSuchProcess:
            return
        if name not in ("postgres", "postmaster"):
            raise StackError(f"{lock} names pid {pid}, which is now `{name}`, not "
                             f"PostgreSQL: no server uses {data}, so delete {lock} and run "
                             "`up` again")


def program(stack: Stack) -> Program:
    argv = [str(bin_dir() / "postgres"), "-D", str(data_dir(stack)),
            "-p", str(stack.ports["postgres"]), "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=", "-c", f"max_connections={MAX_CONNECTIONS}"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C",
           "HOME": str(data_dir(stack))}
    # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to leave.
    return Program("postgres", argv, env, str(data_dir(stack)), user=os_user(),
                   stop_signal="INT")


def connect(stack: Stack, password: str, database: str = "postgres"):
    import psycopg

    # Autocommit: CREATE DATABASE cannot run in a transaction.
    return psycopg.connect(host="127.0.0.1", port=stack.ports["postgres"], user=SUPERUSER,
                           password=password, dbname=database, connect_timeout=3,
                           autocommit=True)


def ensure_databases(stack: Stack, password: str) -> None:
    """The databases and extensions Prefect and MLflow need; existing ones are kept."""
    with connect(stack, password) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')
                print(f"  database {name} created")
    for name, extensions in DATABASES.items():
        with connect(stack, password, name) as conn:
            for extension in extensions:
                conn.execute(f'CREATE EXTENSION IF NOT EXISTS "{extension}"')
