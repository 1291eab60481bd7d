"""Bytes behind a URI: a local path, file:// or s3://, each failure an InvalidInputError."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

from model.data.arrays import InvalidInputError, SourceUnavailableError
from model.fileio import atomic_write, s3_endpoint_url

_COPY_CHUNK = 8 * 2**20
# What pyarrow's S3 errors say when the endpoint, not the request, is at fault: worth a
# retry. Anything else (access denied, no such bucket, a bad key) is not.
_TRANSIENT_S3 = ("NETWORK_CONNECTION", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "THROTTL",
                 "INTERNAL_FAILURE", "REQUEST_TIMEOUT", "HTTP status 5", "timed out",
                 "Connection reset", "connection")


def _s3_error(message: str, e: OSError) -> InvalidInputError:
    text = str(e)
    transient = any(marker.lower() in text.lower() for marker in _TRANSIENT_S3)
    return (SourceUnavailableError if transient else InvalidInputError)(f"{message}: {e}")


def _s3_filesystem() -> Any:
    from pyarrow import fs

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    kwargs: dict[str, Any] = {
        "region": region,
        "connect_timeout": 10.0,
        # No retries here: retry policy belongs to the task layer, which knows what is transient.
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=1),
    }
    endpoint = s3_endpoint_url()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    return fs.S3FileSystem(**kwargs)


def _s3_path(uri: str) -> str:
    parsed = urlparse(uri)
    key = parsed.path.lstrip("/")
    if not parsed.netloc or not key:
        raise InvalidInputError(f"{uri} is not an s3://bucket/key URI")
    return f"{parsed.netloc}/{key}"


def _s3_info(uri: str) -> tuple[Any, str, Any]:
    """(filesystem, bucket/key, FileInfo) of an existing S3 object."""
    from pyarrow import fs

    s3 = _s3_filesystem()
    path = _s3_path(uri)
    try:
        info = s3.get_file_info(path)
    except OSError as e:
        raise _s3_error(f"cannot reach {uri} (check AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL "
                        "and the AWS credentials)", e) from e
    if info.type == fs.FileType.NotFound:
        raise InvalidInputError(f"no such file: {uri}")
    if info.type != fs.FileType.File:
        raise InvalidInputError(f"{uri} is a folder, not a file; name one object: s3://bucket/key")
    return s3, path, info


def redact(uri: str | os.PathLike[str]) -> str:
    """`uri` as a message, a log line or a parameter may show it: user-info, query and
    fragment (a password, a presigned URL's signature, a token) become `***`."""
    text = os.fspath(uri)
    parts = urlsplit(text)
    if "://" not in text or not ("@" in parts.netloc or parts.query or parts.fragment):
        return text
    netloc = ("***@" if "@" in parts.netloc else "") + parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query and "***",
                       parts.fragment and "***"))


def _local_path(uri: str | os.PathLike[str]) -> Path | None:
    """The local path a URI names, or None for s3://. Raises for other schemes, and for a
    URI that carries credentials, before they can reach a message."""
    if isinstance(uri, os.PathLike):
        return Path(uri)
    if redact(uri) != uri:
        raise InvalidInputError(
            f"{redact(uri)}: a URI must not carry credentials (user-info, a signed query): "
            "give S3 credentials through AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE")
    if uri.startswith("s3://"):
        return None
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidInputError(
                f"{uri}: file:// URIs must name a local path (file:///abs/path)"
            )
        return Path(unquote(parsed.path))
    if "://" in uri:
        raise InvalidInputError(
            f"{uri}: unsupported URI scheme; use a local path, file:// or s3://"
        )
    return Path(uri).expanduser()


def _uri_size(uri: str | os.PathLike[str]) -> int:
    path = _local_path(uri)
    if path is None:
        return int(_s3_info(str(uri))[2].size)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidInputError(f"no such file: {uri}") from None
    except OSError as e:
        raise InvalidInputError(f"cannot read {uri}: {e}") from e
    if not path.is_file():
        raise InvalidInputError(f"{uri} is not a file")
    return st.st_size


def open_uri(uri: str | os.PathLike[str]) -> BinaryIO:
    """A readable binary file object for a local path, file:// or s3:// URI."""
    path = _local_path(uri)
    if path is None:
        s3, key, _ = _s3_info(str(uri))
        try:
            return s3.open_input_stream(key)
        except OSError as e:
            raise _s3_error(f"cannot read {uri}", e) from e
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InvalidInputError(f"no such file: {uri}") from None
    except OSError as e:
        raise InvalidInputError(f"cannot read {uri}: {e}") from e


def read_bytes(uri: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
    """The whole content of a local path, file:// or s3:// URI, refusing more than max_bytes."""
    if max_bytes is not None:
        size = _uri_size(uri)
        if size > max_bytes:
            raise InvalidInputError(_too_big(uri, size, max_bytes))
    with open_uri(uri) as f:
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as e:
            raise InvalidInputError(f"cannot read {uri}: {e}") from e
    # The size can change between stat and read; the cap holds either way.
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidInputError(_too_big(uri, len(data), max_bytes))
    return data


def _too_big(uri: str | os.PathLike[str], size: int, max_bytes: int) -> str:
    return f"{uri} is {size} bytes, more than the limit of {max_bytes}; refused unread"


def localize(source: str, cache: Path) -> Path:
    """A local path holding the source's bytes; s3:// objects are copied into the cache once."""
    path = _local_path(source)
    if path is not None:
        if not path.exists():
            raise InvalidInputError(f"no such file: {source}")
        return path
    s3, key, info = _s3_info(source)
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    # Keyed by name, size and mtime so that an overwritten object is fetched again.
    tag = hashlib.sha256(f"{key}\0{info.size}\0{mtime}".encode()).hexdigest()[:32]
    target = cache / "s3" / tag / PurePosixPath(key).name
    if target.is_file() and target.stat().st_size == info.size:
        return target
    try:
        with s3.open_input_stream(key) as src, atomic_write(target) as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
    except OSError as e:
        raise _s3_error(f"cannot copy {source} to {target}", e) from e
    return target
