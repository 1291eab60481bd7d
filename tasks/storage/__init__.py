"""Object storage behind one small interface: a local directory (`LocalStore`) or any S3
endpoint (`S3Store`), so the same code runs embedded and on a cluster. `open_store` picks
the backend from a URI.
"""

from __future__ import annotations

from typing import Any

from tasks.storage.base import (
    ObjectStore,
    check_location,
    has_scheme,
    is_local_path,
    parse_store_uri,
    validate_key,
)
from tasks.storage.errors import MissingObjectError, ObjectExistsError, StorageError
from tasks.storage.local import LocalStore
from tasks.storage.s3 import S3Store

__all__ = ["LocalStore", "MissingObjectError", "ObjectExistsError", "ObjectStore", "S3Store",
           "StorageError", "check_location", "open_location", "open_store", "parse_store_uri",
           "validate_key"]


def open_store(uri: str, **s3_options: Any) -> ObjectStore:
    """'s3://bucket/some/prefix' -> S3Store(**s3_options); 'file:///abs' or a plain path
    -> LocalStore (created if missing; s3_options are ignored there, so one config can
    carry endpoint settings whichever backend its URI picks)."""
    kind, location, prefix = parse_store_uri(uri)
    if kind == "s3":
        return S3Store(location, prefix, **s3_options)
    return LocalStore(location)


def open_location(location: str, default_store: str) -> tuple[ObjectStore, str]:
    """(store, key prefix ending in '/' or empty): a URI or an absolute path is a store of
    its own, rooted there; a relative path is a key prefix in `default_store`."""
    check_location(location)
    if has_scheme(location) or is_local_path(location):
        return open_store(location), ""
    return open_store(default_store), location.rstrip("/") + "/"
