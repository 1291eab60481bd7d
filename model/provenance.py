"""Which code ran: the git commit, marked `-dirty` when the tree differs from it.

A copied tree without `.git` (a GPU machine, a worker image) carries the commit in a
`COMMIT` file at the project root, written before the copy: `git describe --always --dirty
> COMMIT`. The MLflow params and the benchmark both read it from here, so neither names
code that did not run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMIT_FILE = "COMMIT"


def code_commit(root: Path = ROOT) -> str:
    """`<sha>` for a clean checkout, `<sha>-dirty` for changed tracked files, the COMMIT
    file's content without git, else "unknown"."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True, text=True, check=True, cwd=root, timeout=10,
        ).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        recorded = (root / COMMIT_FILE).read_text().strip()
    except OSError:
        return "unknown"
    return recorded or "unknown"


def installed_packages() -> str:
    """`name==version` of every installed distribution, one a line, sorted: the package
    set that ran, in a form `pip install -r` takes."""
    from importlib.metadata import distributions

    pins = {f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"]}
    return "".join(f"{pin}\n" for pin in sorted(pins, key=str.lower))
