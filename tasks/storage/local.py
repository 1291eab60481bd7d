"""LocalStore: a directory behind the ObjectStore interface, the embedded default."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

from model.fileio import atomic_write
from tasks.storage.base import CHUNK, ObjectStore, validate_key
from tasks.storage.errors import MissingObjectError, ObjectExistsError, StorageError

log = logging.getLogger(__name__)


class LocalStore(ObjectStore):
    """A local directory; `content_type` is ignored. Unlike on S3, a key cannot be both an
    object and a prefix of other keys (the project's key layouts never need that)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create storage directory {self.root}: {e.strerror}; check "
                               "the path and its permissions") from e
        self.uri_prefix = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _os_error(self, action: str, key: str, e: OSError) -> StorageError:
        return StorageError(f"{action} {self.uri(key)} failed: {e.strerror or e}; check that "
                            f"{self.root} is writable and has free space")

    def _layout_error(self, key: str, e: OSError) -> StorageError:
        return StorageError(f"cannot put {self.uri(key)}: it is a prefix of other keys, or one of "
                            f"its parents is already an object ({e.strerror}); a local store "
                            "cannot hold both")

    def _publish(self, key: str, write: Callable[[IO[bytes]], object], if_absent: bool) -> str:
        target = self._path(key)
        try:
            # exclusive=True publishes with os.link: of two writers exactly one wins.
            with atomic_write(target, exclusive=if_absent) as f:
                write(f)
        except FileExistsError as e:
            if if_absent and target.is_file():
                raise ObjectExistsError(f"{self.uri(key)} already exists") from e
            raise self._layout_error(key, e) from e
        except (IsADirectoryError, NotADirectoryError) as e:
            raise self._layout_error(key, e) from e
        except OSError as e:
            # os.link names both paths in its error; nothing else here does.
            if if_absent and e.filename2 is not None:
                raise StorageError(f"conditional put of {self.uri(key)} needs hard links, which "
                                   f"the filesystem under {self.root} refused: {e.strerror}") from e
            raise self._os_error("put", key, e) from e
        log.debug("stored %s", self.uri(key))
        return self.uri(key)

    def put(self, key: str, data: bytes, *, content_type: str | None = None,
            if_absent: bool = False) -> str:
        return self._publish(key, lambda f: f.write(data), if_absent)

    def put_file(self, key: str, path: str | os.PathLike, *, if_absent: bool = False) -> str:
        with open(path, "rb") as src:
            return self._publish(key, lambda f: shutil.copyfileobj(src, f, CHUNK), if_absent)

    def _open(self, key: str) -> IO[bytes]:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise MissingObjectError(f"no object at {self.uri(key)}") from e
        except OSError as e:
            raise self._os_error("get", key, e) from e

    def get(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def get_file(self, key: str, path: str | os.PathLike) -> Path:
        dest = Path(path)
        with self._open(key) as src, atomic_write(dest) as f:
            shutil.copyfileobj(src, f, CHUNK)
        return dest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()
