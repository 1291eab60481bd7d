"""S3Store against moto's S3 server, a real HTTP server in a subprocess on 127.0.0.1
(the `endpoint` fixture of conftest.py).

Faults (503s, corruption) are injected with botocore `before-send` hooks, so botocore's
own retry and checksum machinery handles them exactly as it would a real endpoint's.
"""

import base64
import contextlib
import hashlib
import os
import time
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.awsrequest import AWSResponse

from tasks import storage
from tasks.storage import MissingObjectError, ObjectExistsError, S3Store, StorageError

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def store(endpoint: str, bucket: str) -> S3Store:
    return S3Store(bucket, "runs/r1", endpoint_url=endpoint, max_attempts=3)


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

    table = pa.table({"id": [1, 2], "label": [0, 9]})
    store.put_parquet("preds.parquet", table)
    assert pq.read_table(pa.BufferReader(store.get("preds.parquet"))).equals(table)


def test_list_exists_delete_stay_under_prefix(store: S3Store, endpoint: str, bucket: str) -> None:
    raw_client(endpoint).put_object(Bucket=bucket, Key="runs/r10/outside", Body=b"x")
    for key in ["b/2", "a/1", "ab/3"]:
        store.put(key, b"v")

    assert store.list() == ["a/1", "ab/3", "b/2"]
    assert store.list("a/") == ["a/1"]
    assert store.list("a") == ["a/1", "ab/3"]
    assert store.exists("a/1")
    assert not store.exists("a")

    store.delete("a/1")
    store.delete("a/1")  # absent: no error
    assert not store.exists("a/1")
    assert store.list() == ["ab/3", "b/2"]
    with pytest.raises(MissingObjectError, match=f"s3://{bucket}/runs/r1/a/1"):
        store.get("a/1")


def test_sha256_matches_local_and_server_checksum(
    store: S3Store, endpoint: str, bucket: str
) -> None:
    data = os.urandom(2 * storage._CHUNK + 3)
    store.put("blob", data)

    assert store.sha256("blob") == hashlib.sha256(data).hexdigest()
    # The server kept the SHA-256 the client sent, which is what lets AWS reject a
    # corrupted upload.
    head = raw_client(endpoint).head_object(
        Bucket=bucket, Key="runs/r1/blob", ChecksumMode="ENABLED"
    )
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_multipart_put_file(
    store: S3Store, endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 MiB parts are boto3's default; a 5 MiB threshold makes a 12 MiB file two parts.
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024))

    store.put_file("big.bin", src)

    assert store.sha256("big.bin") == hashlib.sha256(src.read_bytes()).hexdigest()
    etag = raw_client(endpoint).head_object(Bucket=bucket, Key="runs/r1/big.bin")["ETag"]
    assert etag.endswith('-2"')  # S3's mark of a two-part upload


def test_missing_bucket_is_named(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = S3Store("no-such-bucket-here", endpoint_url=endpoint, max_attempts=2)
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (6 * 1024 * 1024))

    for call in (
        lambda: s.put("k", b"x"),
        lambda: s.put_file("k", big),  # the managed upload wraps errors its own way
        lambda: s.get("k"),
        lambda: s.list(),
    ):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
            call()
    # HEAD has no error body, so a missing bucket reads as a missing object (documented).
    assert s.exists("k") is False


def test_if_absent_is_enforced_by_moto(store: S3Store, tmp_path: Path) -> None:
    # moto 5.x honours `If-None-Match: *` on PutObject and CompleteMultipartUpload with
    # 412 PreconditionFailed, as AWS does.
    store.put("manifest.json", b"first", if_absent=True)
    with pytest.raises(ObjectExistsError, match=r"manifest\.json"):
        store.put("manifest.json", b"second", if_absent=True)
    src = tmp_path / "f"
    src.write_bytes(b"third")
    with pytest.raises(ObjectExistsError):
        store.put_file("manifest.json", src, if_absent=True)
    assert store.get("manifest.json") == b"first"

    store.put_file("other.json", src, if_absent=True)
    assert store.get("other.json") == b"third"


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


def test_persistent_503s_give_up_after_max_attempts(endpoint: str, bucket: str) -> None:
    s = S3Store(bucket, endpoint_url=endpoint, max_attempts=2)
    attempts: list[int] = []

    def down(request, **kwargs):  # type: ignore[no-untyped-def]
        attempts.append(1)
        body = b"<Error><Code>ServiceUnavailable</Code><Message>busy</Message></Error>"
        return AWSResponse(request.url, 503, {}, _Raw(body))

    s.client.meta.events.register("before-send.s3.PutObject", down)
    with pytest.raises(StorageError, match=r"kept failing .* after 2 attempts"):
        s.put("k", b"x")
    assert len(attempts) == 2
    assert not S3Store(bucket, endpoint_url=endpoint).exists("k")


def test_corruption_in_transit_is_caught_on_read(store: S3Store) -> None:
    # Flip bytes after the checksum header was computed. AWS would reject this PUT with
    # BadDigest; moto stores it unverified, so this shows the read-side check.
    def corrupt(request, **kwargs):  # type: ignore[no-untyped-def]
        request.body = b"X" + request.body.read()[1:]

    store.client.meta.events.register("before-send.s3.PutObject", corrupt)
    store.put("data", b"original bytes")
    store.client.meta.events.unregister("before-send.s3.PutObject", corrupt)

    with pytest.raises(StorageError, match="do not match the stored checksum"):
        store.get("data")
    with contextlib.suppress(StorageError):
        store.delete("data")
