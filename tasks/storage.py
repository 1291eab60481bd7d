"""Object storage behind one small interface: a local directory or any S3 endpoint.

Flows write predictions, manifests and checkpoints through `ObjectStore`, so the same
code runs against the embedded default (`LocalStore`, a directory) and a cluster's
S3-compatible service (`S3Store`: AWS, MinIO, Ceph, or moto in tests).

Both backends share one key grammar (relative, '/'-separated, no '.', '..' or empty
segments, no backslashes) so a key that works locally works on S3 and cannot escape a
local root. Writes are atomic: a reader sees the old object, the new one, or none,
never a partial one.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import logging
import os
import re
import secrets
import shutil
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from model.checkpoint import fsync_dir as _fsync_dir

if TYPE_CHECKING:
    import pyarrow

log = logging.getLogger(__name__)

# Temp files live next to their target so os.replace/os.link stay on one filesystem;
# the marker lets list() hide them and key validation keep user keys out of their way.
_TMP_MARKER = ".storage-tmp-"
_CHUNK = 1 << 20  # bytes per read when streaming files and bodies
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"


class StorageError(RuntimeError):
    """Storage failed after bounded retries; the message names the endpoint, bucket or
    key and what to check (credentials, bucket exists, endpoint reachable)."""


class ObjectExistsError(StorageError):
    """A conditional put (`if_absent=True`) found the key already there."""


class MissingObjectError(StorageError, KeyError):
    """The object does not exist. Also a KeyError, so `except KeyError` works."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


def validate_key(key: str) -> str:
    """Return `key` if it is a relative '/'-separated key; raise ValueError otherwise."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"storage key must be a non-empty string, got {key!r}")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r} contains a backslash or NUL; use '/' only")
    if key.startswith("/"):
        raise ValueError(f"storage key {key!r} is absolute; keys are relative to the store")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(
                f"storage key {key!r} has an empty, '.' or '..' segment; "
                "use plain names like 'runs/abc/model.pt'"
            )
        if segment.startswith(_TMP_MARKER):
            raise ValueError(f"storage key {key!r} uses the reserved prefix {_TMP_MARKER!r}")
    return key


def _validate_prefix(prefix: str) -> str:
    # A list prefix may be partial ('runs/ab') or end in '/', but must not climb out.
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") and len(prefix) > 1 else prefix)
    return prefix


class ObjectStore(abc.ABC):
    """Keys are relative to `uri_prefix`; every method takes and returns such keys."""

    uri_prefix: str

    def uri(self, key: str) -> str:
        return f"{self.uri_prefix}/{validate_key(key)}"

    @abc.abstractmethod
    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        if_absent: bool = False,
    ) -> str:
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

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix` (plain string match, as S3 does), sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error (as on S3)."""

    def put_parquet(self, key: str, table: pyarrow.Table) -> str:
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return self.put(key, buffer.getvalue(), content_type=PARQUET_CONTENT_TYPE)

    def sha256(self, key: str) -> str:
        return hashlib.sha256(self.get(key)).hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri_prefix!r})"


# --------------------------------------------------------------------------- local


def _write_atomically(target: Path, write: Any, *, exclusive: bool) -> None:
    """Call `write(fileobj)` on a temp file beside `target`, fsync it, then publish it.

    exclusive=False: os.replace, so the last writer wins. exclusive=True: os.link, which
    fails if `target` exists, so of two concurrent writers exactly one wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{_TMP_MARKER}{secrets.token_hex(8)}"
    # Not mkstemp: its 0600 mode would stick to the object; 0666 lets the umask decide,
    # as for any plain write.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, target)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class LocalStore(ObjectStore):
    """A local directory: the embedded default. `content_type` is accepted and ignored.

    A key cannot be both an object and a prefix of other keys here (a file cannot also
    be a directory), unlike on S3; the project's key layouts never need that.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                f"cannot create storage directory {self.root}: {e.strerror}; "
                "check the path and its permissions"
            ) from e
        self.uri_prefix = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _os_error(self, action: str, key: str, e: OSError) -> StorageError:
        return StorageError(
            f"{action} {self.uri(key)} failed: {e.strerror or e}; "
            f"check that {self.root} is writable and has free space"
        )

    def _layout_error(self, key: str, e: OSError) -> StorageError:
        return StorageError(
            f"cannot put {self.uri(key)}: it is a prefix of other keys, or one of its "
            f"parents is already an object ({e.strerror}); a local store cannot hold both"
        )

    def _publish(self, key: str, write: Any, if_absent: bool) -> str:
        target = self._path(key)
        try:
            _write_atomically(target, write, exclusive=if_absent)
        except FileExistsError as e:
            if if_absent and target.is_file():
                raise ObjectExistsError(f"{self.uri(key)} already exists") from e
            raise self._layout_error(key, e) from e
        except (IsADirectoryError, NotADirectoryError) as e:
            raise self._layout_error(key, e) from e
        except OSError as e:
            # os.link names both paths in its error; nothing else here does.
            if if_absent and e.filename2 is not None:
                raise StorageError(
                    f"conditional put of {self.uri(key)} needs hard links, which the "
                    f"filesystem under {self.root} refused: {e.strerror}"
                ) from e
            raise self._os_error("put", key, e) from e
        log.debug("stored %s", self.uri(key))
        return self.uri(key)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        if_absent: bool = False,
    ) -> str:
        return self._publish(key, lambda f: f.write(data), if_absent)

    def put_file(self, key: str, path: str | os.PathLike, *, if_absent: bool = False) -> str:
        with open(path, "rb") as src:
            return self._publish(key, lambda f: shutil.copyfileobj(src, f, _CHUNK), if_absent)

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
        with self._open(key) as src:
            _write_atomically(dest, lambda f: shutil.copyfileobj(src, f, _CHUNK), exclusive=False)
        return dest

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        # Walk only the deepest directory the prefix fully names.
        base_dir = prefix.rpartition("/")[0]
        base = self.root.joinpath(*base_dir.split("/")) if base_dir else self.root
        keys = []
        for dirpath, _dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_TMP_MARKER):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._os_error("delete", key, e) from e

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self._open(key) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


# ------------------------------------------------------------------------------ S3

# put_file sends files at least this big as a managed multipart upload.
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes; checkpoints (~20-60 MB) stay single PUTs
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
    "Forbidden",
}
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_THROTTLE_CODES = {"SlowDown", "ServiceUnavailable", "503", "InternalError", "500"}


def _redact(url: str) -> str:
    # An endpoint URL may carry user:password; never let it reach a message or log.
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


class S3Store(ObjectStore):
    """Objects under `s3://bucket/prefix` on AWS or any S3-compatible endpoint.

    Transport retries are botocore's "standard" mode (bounded by `max_attempts`, with
    backoff, on throttling, 5xx and connection errors); what is left after them is
    raised as StorageError. Every put carries a SHA-256 checksum, which AWS checks
    against the bytes it received (moto stores it unchecked), and every get asks for it
    back so botocore checks the bytes this side received.

    `if_absent=True` sends `If-None-Match: *`. AWS and moto honour it; an endpoint
    that ignores the header degrades to last-writer-wins, which is harmless where, as in
    this project, a conditional key is always written with identical content (manifests,
    content-addressed files). Conditional puts always go as one PUT (S3 allows up to
    5 GiB), because boto3's managed upload does not pass `IfNoneMatch` through.

    The boto3 client is built on first use and dropped when pickled, so a store can be
    handed to Prefect tasks in other processes.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 5,
        read_timeout: float = 30,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        self.region = region
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.uri_prefix = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """The endpoint as it may appear in messages (no credentials)."""
        if self.endpoint_url:
            return _redact(self.endpoint_url)
        return f"AWS S3 ({self.region or 'default region'})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, built on first use (thread-safe)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            # botocore's "max_attempts" counts retries only; "total_max_attempts" counts
            # the first request too, which is what our max_attempts promises.
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            # Self-hosted endpoints rarely have wildcard DNS for virtual-hosted buckets.
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        # A private session: boto3's default session is not thread-safe to build clients.
        session = boto3.session.Session()
        return session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
        )

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- error mapping -------------------------------------------------------------

    def _error(self, e: Exception, action: str, key: str | None) -> StorageError:
        """Turn what botocore raised (after its retries) into a StorageError that says
        what to check."""
        from botocore.exceptions import (
            BotoCoreError,
            ChecksumError,
            ClientError,
            ConnectionError,
            ConnectTimeoutError,
            EndpointConnectionError,
            FlexibleChecksumError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = self.uri(key) if key is not None else self.uri_prefix
        # boto3's managed upload re-raises ClientError as S3UploadFailedError.
        cause = e.__cause__ or e.__context__
        if not isinstance(e, ClientError | BotoCoreError) and isinstance(cause, ClientError):
            e = cause

        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            message = err.get("Message") or ""
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            attempts = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            if code == "NoSuchBucket":
                return StorageError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}: "
                    f"create it or fix the URI {self.uri_prefix!r}"
                )
            if code in _MISSING_CODES:
                return MissingObjectError(f"no object at {where}")
            if code in _CONFLICT_CODES:
                return ObjectExistsError(f"{where} already exists ({code})")
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"credentials were refused by {self.endpoint} ({code}) for {action} "
                    f"{where}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                    "(or the profile in use) and the bucket policy"
                )
            if code in ("BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch"):
                return StorageError(
                    f"{action} {where}: {self.endpoint} rejected the upload's checksum "
                    f"({code}), so the bytes were corrupted in transit; retry the task"
                )
            if code in _THROTTLE_CODES or (status is not None and status >= 500):
                return StorageError(
                    f"{action} {where}: S3 endpoint {self.endpoint} kept failing "
                    f"({code or status}: {message}) after {attempts} attempts; "
                    "check the service's health or retry later"
                )
            return StorageError(
                f"{action} {where} failed at {self.endpoint}: {code or status}: {message}"
            )
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"no usable AWS credentials for {self.endpoint}: set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if isinstance(e, ChecksumError | FlexibleChecksumError):
            return StorageError(
                f"{action} {where}: the bytes received from {self.endpoint} do not match "
                f"the stored checksum ({e}); retry, and if it persists the object is corrupt"
            )
        if isinstance(e, EndpointConnectionError | ConnectTimeoutError):
            return StorageError(
                f"cannot reach S3 endpoint {self.endpoint} after {self.max_attempts} "
                f"attempts for {action} {where}: {e}; check the endpoint URL "
                "(AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL), the network, and that the "
                "service is running"
            )
        if isinstance(e, ConnectionError | HTTPClientError):
            # Connected, then the connection broke: a closed socket, a read timeout.
            return StorageError(
                f"the connection to S3 endpoint {self.endpoint} broke off during "
                f"{action} {where}, after {self.max_attempts} attempts: {e}; the service "
                "or a proxy on the way is dropping requests: check its health, then retry"
            )
        return StorageError(f"{action} {where} failed at {self.endpoint}: {e}")

    def _call(self, action: str, key: str | None, fn: Any, /, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error(e, action, key) from e

    # -- operations ----------------------------------------------------------------

    def _put_body(self, key: str, body: Any, content_type: str | None, if_absent: bool) -> str:
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "Body": body,
            "ChecksumAlgorithm": "SHA256",
        }
        if content_type:
            kwargs["ContentType"] = content_type
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        self._call("put", key, self.client.put_object, **kwargs)
        log.debug("stored %s", self.uri(key))
        return self.uri(key)

    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        if_absent: bool = False,
    ) -> str:
        # A single PUT is atomic on S3: the key shows the old object until it completes.
        return self._put_body(key, bytes(data), content_type, if_absent)

    def put_file(self, key: str, path: str | os.PathLike, *, if_absent: bool = False) -> str:
        size = os.path.getsize(path)
        if if_absent or size < MULTIPART_THRESHOLD:
            with open(path, "rb") as f:
                return self._put_body(key, f, None, if_absent)

        from boto3.s3.transfer import TransferConfig

        # Multipart is atomic too: the object appears only on CompleteMultipartUpload.
        self._call(
            "put",
            key,
            self.client.upload_file,
            Filename=os.fspath(path),
            Bucket=self.bucket,
            Key=self._key(key),
            ExtraArgs={"ChecksumAlgorithm": "SHA256"},
            Config=TransferConfig(multipart_threshold=MULTIPART_THRESHOLD),
        )
        log.debug("stored %s (%d bytes, multipart)", self.uri(key), size)
        return self.uri(key)

    def _stream(self, key: str, sink: Any) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        response = self._call(
            "get",
            key,
            self.client.get_object,
            Bucket=self.bucket,
            Key=self._key(key),
            ChecksumMode="ENABLED",
        )
        body = response["Body"]
        try:
            # Reading the body happens outside botocore's retry loop; a drop mid-stream or
            # a checksum mismatch (checked at the end of the stream) surfaces here.
            for chunk in body.iter_chunks(_CHUNK):
                sink(chunk)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "get", key) from e
        finally:
            body.close()

    def get(self, key: str) -> bytes:
        buffer = io.BytesIO()
        self._stream(key, buffer.write)
        return buffer.getvalue()

    def get_file(self, key: str, path: str | os.PathLike) -> Path:
        dest = Path(path)
        _write_atomically(dest, lambda f: self._stream(key, f.write), exclusive=False)
        return dest

    def exists(self, key: str) -> bool:
        # HEAD has no body, so a missing bucket also reads as 404 here: exists() is
        # False and the next put or get names the missing bucket.
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except MissingObjectError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        _validate_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []

        def collect() -> None:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + prefix):
                keys.extend(item["Key"][len(base) :] for item in page.get("Contents", []))

        self._call("list", None, collect)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        self._stream(key, digest.update)
        return digest.hexdigest()


# ---------------------------------------------------------------------------- open

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ACCEPTED = "s3://bucket[/prefix], file:///absolute/path, or a local directory path"


def open_store(uri: str, **s3_options: Any) -> ObjectStore:
    """'s3://bucket/some/prefix' -> S3Store(**s3_options); 'file:///abs' or a plain path
    -> LocalStore (created if missing; s3_options are ignored there, so one config can
    carry endpoint settings whichever backend its URI picks)."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"empty storage URI {uri!r}: use {_ACCEPTED}")
    if not _SCHEME.match(uri):
        return LocalStore(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"storage URI {uri!r} names no bucket: use {_ACCEPTED}")
        return S3Store(parts.netloc, unquote(parts.path).strip("/"), **s3_options)
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ValueError(
                f"storage URI {uri!r} is not an absolute file URI "
                f"(file:///absolute/path): use {_ACCEPTED}"
            )
        return LocalStore(path)
    raise ValueError(f"unsupported storage URI {uri!r}: use {_ACCEPTED}")
