"""S3Store against moto's S3 server, a real HTTP server in a subprocess on 127.0.0.1
(the `moto_endpoint` fixture of tests/conftest.py).

Faults (503s, corruption) are injected with botocore `before-send` hooks, so botocore's
own retry and checksum machinery handles them exactly as it would a real endpoint's.
"""

import base64
import hashlib
import os
import time
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from tasks.storage import MissingObjectError, ObjectExistsError, S3Store, StorageError
from tasks.storage import s3 as s3_module
from tasks.storage.base import CHUNK

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    raw_client(moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def store(moto_endpoint: str, bucket: str) -> S3Store:
    return S3Store(bucket, "runs/r1", endpoint_url=moto_endpoint, max_attempts=3)


def raw_client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **kwargs: object) -> list[bytes]:
        return [self.body]


# ---------------------------------------------------------------------------- tests


def test_round_trips(store: S3Store, bucket: str, tmp_path: Path) -> None:
    assert store.put("a/b.txt", b"hello", content_type="text/plain") == (
        f"s3://{bucket}/runs/r1/a/b.txt"
    )
    assert store.get("a/b.txt") == b"hello"
    store.put("a/b.txt", b"overwritten")
    assert store.get("a/b.txt") == b"overwritten"

    src = tmp_path / "ckpt.pt"
    src.write_bytes(os.urandom(300_000))
    store.put_file("ckpt/epoch-1.pt", src)
    dest = store.get_file("ckpt/epoch-1.pt", tmp_path / "down" / "ckpt.pt")
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ckpt.pt"]


def test_exists_and_get_stay_under_prefix(
    store: S3Store, moto_endpoint: str, bucket: str
) -> None:
    raw_client(moto_endpoint).put_object(Bucket=bucket, Key="runs/r10/outside", Body=b"x")
    raw_client(moto_endpoint).put_object(Bucket=bucket, Key="a/1", Body=b"x")
    store.put("a/1", b"v")

    assert store.exists("a/1")
    assert not store.exists("a")  # a prefix is not an object
    assert not store.exists("outside")
    assert store.get("a/1") == b"v"
    with pytest.raises(MissingObjectError, match=f"s3://{bucket}/runs/r1/b/2"):
        store.get("b/2")


def test_server_keeps_the_checksum_the_client_sent(
    store: S3Store, moto_endpoint: str, bucket: str
) -> None:
    data = os.urandom(2 * CHUNK + 3)
    store.put("blob", data)

    assert store.get("blob") == data  # streamed back in several chunks
    # The server kept the SHA-256 the client sent, which is what lets AWS reject a
    # corrupted upload.
    head = raw_client(moto_endpoint).head_object(
        Bucket=bucket, Key="runs/r1/blob", ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_multipart_put_file(
    store: S3Store,
    moto_endpoint: str,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 8 MiB parts are boto3's default; a 5 MiB threshold makes a 12 MiB file two parts.
    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024))

    store.put_file("big.bin", src)

    assert store.get("big.bin") == src.read_bytes()
    etag = raw_client(moto_endpoint).head_object(Bucket=bucket, Key="runs/r1/big.bin")["ETag"]
    assert etag.endswith('-2"')  # S3's mark of a two-part upload


def test_missing_bucket_is_named(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = S3Store("no-such-bucket-here", endpoint_url=moto_endpoint, max_attempts=2)
    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (6 * 1024 * 1024))

    for call in (
        lambda: s.put("k", b"x"),
        lambda: s.put_file("k", big),  # the managed upload wraps errors its own way
        lambda: s.get("k"),
    ):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
            call()
    # HEAD has no error body, so a missing bucket reads as a missing object (documented).
    assert s.exists("k") is False


def test_if_absent_is_enforced_by_moto(
    store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto 5.x honours `If-None-Match: *` with 412 PreconditionFailed, as AWS does. A
    # conditional put_file goes as one PUT even above the multipart threshold: the managed
    # upload would drop the condition.
    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 4)
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_bytes(b"first file")
    second.write_bytes(b"second file")

    assert store.put_file("manifest.json", first, if_absent=True).endswith("/manifest.json")
    for attempt in (lambda: store.put("manifest.json", b"bytes", if_absent=True),
                    lambda: store.put_file("manifest.json", second, if_absent=True)):
        with pytest.raises(ObjectExistsError, match=r"s3://.*/manifest\.json"):
            attempt()
    assert store.get("manifest.json") == b"first file"
    store.put_file("manifest.json", second)  # unconditional: the last writer wins
    assert store.get("manifest.json") == b"second file"


def test_endpoint_down_fails_fast(closed_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = closed_endpoint  # nothing listens here
    # Credentials of their own: the error must be about the endpoint, whatever ran before.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "down-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "down-secret")
    s = S3Store("bkt", endpoint_url=url, max_attempts=2, connect_timeout=1, read_timeout=2)

    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        s.put("k", b"x")
    elapsed = time.monotonic() - start

    assert elapsed < 15
    assert f"cannot reach S3 endpoint {url} after 2 attempts" in str(info.value)


def test_transient_503s_are_retried(store: S3Store) -> None:
    attempts: list[int] = []

    def flaky(request, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(1)
        if len(attempts) <= 2:
            body = b"<Error><Code>ServiceUnavailable</Code><Message>busy</Message></Error>"
            return AWSResponse(request.url, 503, {}, _Raw(body))
        return None  # let the request through to moto

    store.client.meta.events.register("before-send.s3.PutObject", flaky)
    store.put("retried", b"made it")

    assert len(attempts) == 3
    assert store.get("retried") == b"made it"


def test_persistent_503s_give_up_after_max_attempts(moto_endpoint: str, bucket: str) -> None:
    s = S3Store(bucket, endpoint_url=moto_endpoint, max_attempts=2)
    attempts: list[int] = []

    def down(request, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(1)
        body = b"<Error><Code>ServiceUnavailable</Code><Message>busy</Message></Error>"
        return AWSResponse(request.url, 503, {}, _Raw(body))

    s.client.meta.events.register("before-send.s3.PutObject", down)
    with pytest.raises(StorageError, match=r"kept failing .* after 2 attempts"):
        s.put("k", b"x")
    assert len(attempts) == 2
    assert not S3Store(bucket, endpoint_url=moto_endpoint).exists("k")


def test_corruption_in_transit_is_caught_on_read(store: S3Store, tmp_path: Path) -> None:
    # Flip bytes after the checksum header was computed. AWS would reject this PUT with
    # BadDigest; moto stores it unverified, so this shows the read-side check.
    def corrupt(request, **kwargs):  # type: ignore[no-untyped-def]
        request.body = b"X" + request.body.read()[1:]

    store.client.meta.events.register("before-send.s3.PutObject", corrupt)
    store.put("data", b"original bytes")
    store.client.meta.events.unregister("before-send.s3.PutObject", corrupt)

    with pytest.raises(StorageError, match="do not match the stored checksum"):
        store.get("data")
    with pytest.raises(StorageError, match="do not match the stored checksum"):
        store.get_file("data", tmp_path / "data")
    assert not (tmp_path / "data").exists()
