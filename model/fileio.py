"""File primitives shared by every layer: atomic writes, directory fsync, the S3 endpoint.

One copy of each, here in `model/` because it is the bottom layer: tasks, flows and the
infra scripts import it; it imports only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in `directory` durable; not every platform lets a directory be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: int = 0o666,
    *,
    exclusive: bool = False,
    text: bool = False,
) -> Iterator[IO]:
    """Write to a temp file beside `path`, fsync it, then publish it under `path`.

    A reader, or a crash at any point, sees the old file or the whole new one, never a torn
    one. exclusive=False publishes with os.replace (the last writer wins); exclusive=True
    with os.link, which raises FileExistsError if `path` exists, so that of two concurrent
    writers exactly one wins. `mode` is passed to open() (0o666: the umask decides, as for
    any plain write; 0o600 for secrets).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, target)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def s3_endpoint_url() -> str | None:
    """The S3-compatible endpoint from the environment (SeaweedFS, Ceph, moto), or None for AWS.

    AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL, as in boto3 itself.
    """
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
