"""The object-store interface, the key grammar, and how a URI or path names a store.

One key grammar for both backends, so a key that works locally works on S3 and cannot
escape a local root. Writes are atomic: a reader never sees a partial object.
"""

from __future__ import annotations

import abc
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from model.config import ConfigError

CHUNK = 1 << 20  # bytes per read when streaming files and bodies


def validate_key(key: str) -> str:
    """Return `key` if it is a relative '/'-separated key; ConfigError otherwise."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"storage key must be a non-empty string, got {key!r}")
    if "\\" in key or "\x00" in key:
        raise ConfigError(f"storage key {key!r} contains a backslash or NUL; use '/' only")
    if key.startswith("/"):
        raise ConfigError(f"storage key {key!r} is absolute; keys are relative to the store")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ConfigError(f"storage key {key!r} has an empty, '.' or '..' segment; use plain "
                              "names like 'runs/abc/model.pt'")
    return key


class ObjectStore(abc.ABC):
    """Keys are relative to `uri_prefix`; every method takes such keys."""

    uri_prefix: str

    def uri(self, key: str) -> str:
        return f"{self.uri_prefix}/{validate_key(key)}"

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, content_type: str | None = None,
            if_absent: bool = False) -> str:
        """Store `data` atomically under `key` and return its URI. With `if_absent`,
        raise ObjectExistsError instead of overwriting."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike, *, if_absent: bool = False) -> str:
        """Store the file at `path` under `key`, like `put`."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the object's bytes; MissingObjectError if absent."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike) -> Path:
        """Download the object to `path` atomically (temp file, then rename)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri_prefix!r})"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ACCEPTED = "s3://bucket[/prefix], file:///absolute/path, or a local directory path"


def has_scheme(uri: str) -> bool:
    """Whether `uri` starts with a URI scheme ('s3://', 'file://', ...)."""
    return bool(_SCHEME.match(uri))


def parse_store_uri(uri: str) -> tuple[str, str, str]:
    """('s3', bucket, prefix) for 's3://bucket/prefix'; ('file', path, '') for
    'file:///abs' or a plain path. ConfigError, naming the accepted forms, for the rest."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"empty storage URI {uri!r}: use {_ACCEPTED}")
    if not has_scheme(uri):
        return "file", uri, ""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"storage URI {uri!r} names no bucket: use {_ACCEPTED}")
        return "s3", parts.netloc, unquote(parts.path).strip("/")
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ConfigError(f"storage URI {uri!r} is not an absolute file URI "
                              f"(file:///absolute/path): use {_ACCEPTED}")
        return "file", path, ""
    raise ConfigError(f"unsupported storage URI {uri!r}: use {_ACCEPTED}")


def check_location(location: str) -> str:
    """`location` if it names a store (a URI, or an absolute or ~ path: a local directory)
    or a key prefix in a default store (a relative path); ConfigError otherwise."""
    if has_scheme(location) or is_local_path(location):
        parse_store_uri(location)
        return location
    try:
        validate_key(location.rstrip("/"))
    except ValueError as exc:
        raise ConfigError(
            f"{location!r} is not a usable key prefix in the object store ({exc}); give a "
            "plain relative prefix like 'predictions', an absolute directory, or an s3:// "
            "or file:// URI") from exc
    return location


def is_local_path(location: str) -> bool:
    return os.path.isabs(location) or location.startswith("~")
