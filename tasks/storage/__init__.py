"""Object storage behind one small interface: a local directory or any S3 endpoint.

Flows write predictions, manifests and checkpoints through `ObjectStore`, so the same
code runs against the embedded default (`LocalStore`, a directory: `local.py`) and a
cluster's S3-compatible service (`S3Store`: `s3.py`). `base.py` holds the interface, the
key grammar and `open_store`, which picks a backend from a URI; `errors.py` what they raise.
"""

from tasks.storage.base import (
    ObjectStore,
    check_location,
    open_location,
    open_store,
    parse_store_uri,
    validate_key,
)
from tasks.storage.errors import MissingObjectError, ObjectExistsError, StorageError
from tasks.storage.local import LocalStore
from tasks.storage.s3 import S3Store

__all__ = [
    "LocalStore",
    "MissingObjectError",
    "ObjectExistsError",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "check_location",
    "open_location",
    "open_store",
    "parse_store_uri",
    "validate_key",
]
