"""S3Store: objects under `s3://bucket/prefix` on AWS or any S3-compatible endpoint
(SeaweedFS, Ceph, GCS interoperability, R2; moto in tests), behind the ObjectStore
interface."""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from model.fileio import atomic_write, s3_endpoint_url
from tasks.storage.base import CHUNK, ObjectStore, validate_key
from tasks.storage.errors import MissingObjectError, ObjectExistsError, StorageError

log = logging.getLogger(__name__)

# put_file sends files at least this big as a managed multipart upload.
MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes; checkpoints (~20-60 MB) stay single PUTs
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                     "InvalidToken", "ExpiredToken", "403", "Forbidden"}
_CONFLICT_CODES = {"PreconditionFailed"}
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

    Transport retries are botocore's "standard" mode, bounded by `max_attempts`; what is
    left after them is a StorageError. Puts carry a SHA-256 checksum and gets ask for it
    back, so corruption either way is caught; endpoints that refuse checksum headers (GCS
    interoperability, R2) need `checksums="when_required"` or the equivalent AWS setting.

    `if_absent=True` sends `If-None-Match: *`. An endpoint that ignores it degrades to
    last-writer-wins, harmless here since a conditional key is always written with
    identical content. Conditional puts always go as one PUT: boto3's managed upload does
    not pass `IfNoneMatch` through. The client is dropped when pickled, so a store can be
    handed to Prefect tasks in other processes.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, max_attempts: int = 5, connect_timeout: float = 5,
                 read_timeout: float = 30,
                 checksums: Literal["when_supported", "when_required"] | None = None) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.endpoint_url = endpoint_url or s3_endpoint_url()
        self.region, self.max_attempts = region, max_attempts
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        if checksums not in (None, "when_supported", "when_required"):
            raise ValueError(f"checksums must be when_supported or when_required, got "
                             f"{checksums!r}")
        self.checksums = checksums
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
            # Unset, botocore reads AWS_REQUEST_CHECKSUM_CALCULATION or the config file.
            **({"request_checksum_calculation": self.checksums} if self.checksums else {}),
        )
        # A private session: boto3's default session is not thread-safe to build clients.
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    def _checksum(self) -> dict[str, str]:
        """The put's checksum argument: SHA-256, or none where only required ones are sent
        (botocore before 1.36 knows no such setting; the variable is read here then)."""
        setting = (getattr(self.client.meta.config, "request_checksum_calculation", None)
                   or os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", ""))
        return {} if setting.lower() == "when_required" else {"ChecksumAlgorithm": "SHA256"}

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception, action: str, key: str | None) -> StorageError:
        """Turn what botocore raised (after its retries) into a StorageError that says
        what to check."""
        from botocore import exceptions as errors

        where = self.uri(key) if key is not None else self.uri_prefix
        # boto3's managed upload re-raises ClientError as S3UploadFailedError.
        cause = e.__cause__ or e.__context__
        if (not isinstance(e, errors.ClientError | errors.BotoCoreError)
                and isinstance(cause, errors.ClientError)):
            e = cause

        if isinstance(e, errors.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            message = err.get("Message") or ""
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            attempts = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            if code == "NoSuchBucket":
                return StorageError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}: "
                    f"create it or fix the URI {self.uri_prefix!r}")
            if code in _MISSING_CODES:
                return MissingObjectError(f"no object at {where}")
            if code in _CONFLICT_CODES:
                return ObjectExistsError(f"{where} already exists ({code})")
            if code == "ConditionalRequestConflict":
                return StorageError(
                    f"{action} {where}: {self.endpoint} was still completing another "
                    f"conditional write to the key ({code}); retry the task")
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"credentials were refused by {self.endpoint} ({code}) for {action} "
                    f"{where}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                    "(or the profile in use) and the bucket policy")
            if code in ("BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch"):
                return StorageError(
                    f"{action} {where}: {self.endpoint} rejected the upload's checksum "
                    f"({code}), so the bytes were corrupted in transit; retry the task")
            if code in _THROTTLE_CODES or (status is not None and status >= 500):
                return StorageError(
                    f"{action} {where}: S3 endpoint {self.endpoint} kept failing "
                    f"({code or status}: {message}) after {attempts} attempts; "
                    "check the service's health or retry later")
            return StorageError(
                f"{action} {where} failed at {self.endpoint}: {code or status}: {message}")
        if isinstance(e, errors.NoCredentialsError | errors.PartialCredentialsError):
            return StorageError(
                f"no usable AWS credentials for {self.endpoint}: set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if isinstance(e, errors.ChecksumError | errors.FlexibleChecksumError):
            return StorageError(
                f"{action} {where}: the bytes received from {self.endpoint} do not match "
                f"the stored checksum ({e}); retry, and if it persists the object is corrupt")
        if isinstance(e, errors.EndpointConnectionError | errors.ConnectTimeoutError):
            return StorageError(
                f"cannot reach S3 endpoint {self.endpoint} after {self.max_attempts} "
                f"attempts for {action} {where}: {e}; check the endpoint URL "
                "(AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL), the network, and that the "
                "service is running")
        if isinstance(e, errors.ConnectionError | errors.HTTPClientError):
            # Connected, then the connection broke: a closed socket, a read timeout.
            return StorageError(
                f"the connection to S3 endpoint {self.endpoint} broke off during "
                f"{action} {where}, after {self.max_attempts} attempts: {e}; the service "
                "or a proxy on the way is dropping requests: check its health, then retry")
        return StorageError(f"{action} {where} failed at {self.endpoint}: {e}")

    def _call(self, action: str, key: str | None, fn: Any, /, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error(e, action, key) from e

    def _put_body(self, key: str, body: Any, content_type: str | None, if_absent: bool) -> str:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": body,
                                  **self._checksum()}
        if content_type:
            kwargs["ContentType"] = content_type
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        self._call("put", key, self.client.put_object, **kwargs)
        log.debug("stored %s", self.uri(key))
        return self.uri(key)

    def put(self, key: str, data: bytes, *, content_type: str | None = None,
            if_absent: bool = False) -> str:
        # A single PUT is atomic on S3: the key shows the old object until it completes.
        return self._put_body(key, bytes(data), content_type, if_absent)

    def put_file(self, key: str, path: str | os.PathLike, *, if_absent: bool = False) -> str:
        size = os.path.getsize(path)
        if if_absent or size < MULTIPART_THRESHOLD:
            with open(path, "rb") as f:
                return self._put_body(key, f, None, if_absent)

        from boto3.s3.transfer import TransferConfig

        # Multipart is atomic too: the object appears only on CompleteMultipartUpload.
        self._call("put", key, self.client.upload_file, Filename=os.fspath(path),
                   Bucket=self.bucket, Key=self._key(key), ExtraArgs=self._checksum(),
                   Config=TransferConfig(multipart_threshold=MULTIPART_THRESHOLD))
        log.debug("stored %s (%d bytes, multipart)", self.uri(key), size)
        return self.uri(key)

    def _stream(self, key: str, sink: Any) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        body = self._call("get", key, self.client.get_object, Bucket=self.bucket,
                          Key=self._key(key), ChecksumMode="ENABLED")["Body"]
        try:
            # Reading the body happens outside botocore's retry loop; a drop mid-stream or
            # a checksum mismatch (checked at the end of the stream) surfaces here.
            for chunk in body.iter_chunks(CHUNK):
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
        with atomic_write(dest) as f:
            self._stream(key, f.write)
        return dest

    def exists(self, key: str) -> bool:
        # HEAD has no body, so a missing bucket also reads as 404 here: exists() is
        # False and the next put or get names the missing bucket.
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except MissingObjectError:
            return False
        return True
