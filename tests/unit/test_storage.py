"""LocalStore behaviour, URI dispatch, and S3Store's request shape and error mapping.

The S3 tests here answer requests from a botocore `before-send` hook, so botocore parses
real HTTP responses while no socket is opened; tests/integration talks to a server.
"""

import base64
import hashlib
import os
import pickle
import re
import threading
from pathlib import Path

import pytest
from botocore.awsrequest import AWSResponse

from tasks.storage import (
    LocalStore,
    MissingObjectError,
    ObjectExistsError,
    S3Store,
    StorageError,
    open_store,
)
from tasks.storage.base import CHUNK

BAD_KEYS = ["../x", "a/../../x", "/abs", "a//b", "a/", "a/./b", "a\\b", "", ".", "a/.."]


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------- LocalStore


def test_put_get_round_trip_and_overwrite(store: LocalStore) -> None:
    uri = store.put("runs/r1/preds.csv", b"ID,Labels\n0,3\n", content_type="text/csv")

    assert uri == f"{store.root.as_uri()}/runs/r1/preds.csv"
    assert uri.startswith("file:///")
    assert store.get("runs/r1/preds.csv") == b"ID,Labels\n0,3\n"
    store.put("runs/r1/preds.csv", b"second")
    assert store.get("runs/r1/preds.csv") == b"second"


def test_put_file_and_get_file_round_trip(store: LocalStore, tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    src.write_bytes(os.urandom(3 * CHUNK + 17))

    uri = store.put_file("ckpt/epoch-3.pt", src)
    dest = store.get_file("ckpt/epoch-3.pt", tmp_path / "fresh" / "dir" / "back.pt")

    assert uri.endswith("/ckpt/epoch-3.pt")
    assert dest == tmp_path / "fresh" / "dir" / "back.pt"
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["back.pt"]


def test_objects_get_umask_permissions_not_temp_file_ones(store: LocalStore) -> None:
    umask = os.umask(0o022)
    try:
        store.put("k", b"x")
    finally:
        os.umask(umask)
    assert (store.root / "k").stat().st_mode & 0o777 == 0o644


def test_exists_is_true_for_objects_only(store: LocalStore) -> None:
    assert not store.exists("x/y")
    store.put("x/y", b"1")
    assert store.exists("x/y")
    assert not store.exists("x")  # a prefix is not an object


def test_failed_publish_leaves_no_object_and_no_temp(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("keep", b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="No space left"):
        store.put("new/obj", b"partial?")
    with pytest.raises(StorageError):
        store.put("keep", b"new")

    assert not store.exists("new/obj")
    assert store.get("keep") == b"old"
    assert all_files(store.root) == ["keep"]


def test_failure_while_writing_leaves_nothing(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageError, match="Input/output"):
        store.put("k", b"x" * 1000)
    assert all_files(store.root) == []


def test_if_absent_conflict_keeps_first_content(store: LocalStore, tmp_path: Path) -> None:
    store.put("manifest.json", b"first", if_absent=True)

    with pytest.raises(ObjectExistsError, match=r"manifest\.json"):
        store.put("manifest.json", b"second", if_absent=True)
    src = tmp_path / "f"
    src.write_bytes(b"third")
    with pytest.raises(ObjectExistsError):
        store.put_file("manifest.json", src, if_absent=True)

    assert store.get("manifest.json") == b"first"
    assert all_files(store.root) == ["manifest.json"]
    assert issubclass(ObjectExistsError, StorageError)


def test_racing_if_absent_writers_have_one_winner(store: LocalStore) -> None:
    n = 8
    barrier = threading.Barrier(n)
    won: list[int] = []
    lost: list[int] = []

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.put("lock", f"writer-{i}".encode() * 1000, if_absent=True)
            won.append(i)
        except ObjectExistsError:
            lost.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(won) == 1
    assert len(lost) == n - 1
    assert store.get("lock") == f"writer-{won[0]}".encode() * 1000
    assert all_files(store.root) == ["lock"]


def test_key_cannot_be_both_object_and_prefix(store: LocalStore) -> None:
    store.put("a", b"1")
    with pytest.raises(StorageError, match="prefix of other keys"):
        store.put("a/b", b"2")
    store.put("c/d", b"3")
    with pytest.raises(StorageError, match="prefix of other keys"):
        store.put("c", b"4")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_rejected_everywhere(store: LocalStore, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.uri(key),
    ):
        with pytest.raises(ValueError, match="storage key"):
            call()
    assert all_files(store.root.parent) == []


def test_missing_object_names_its_uri(store: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(MissingObjectError) as info:
        store.get("no/such/key")
    assert store.uri("no/such/key") in str(info.value)
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, StorageError)

    with pytest.raises(MissingObjectError):
        store.get_file("no/such/key", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- open_store


def test_open_store_local_forms(tmp_path: Path) -> None:
    target = tmp_path / "made" / "on demand"

    by_uri = open_store(target.as_uri())
    by_path = open_store(str(target), endpoint_url="http://ignored:1")

    assert isinstance(by_uri, LocalStore)
    assert isinstance(by_path, LocalStore)
    assert target.is_dir()
    assert by_uri.root == by_path.root == target
    assert by_uri.uri_prefix == target.as_uri()
    by_uri.put("k", b"v")
    assert by_path.get("k") == b"v"


def test_open_store_s3_passes_options() -> None:
    s = open_store(
        "s3://my-bucket/some/prefix/", endpoint_url="http://127.0.0.1:9000", max_attempts=2
    )

    assert isinstance(s, S3Store)
    assert (s.bucket, s.prefix, s.endpoint_url, s.max_attempts) == (
        "my-bucket",
        "some/prefix",
        "http://127.0.0.1:9000",
        2,
    )
    assert s.uri("a/b") == "s3://my-bucket/some/prefix/a/b"
    assert open_store("s3://my-bucket").uri("a") == "s3://my-bucket/a"


@pytest.mark.parametrize(
    "uri", ["gs://b/x", "http://host/x", "file://relative/x", "s3://", "s3:///prefix", "", "  "]
)
def test_open_store_rejects_other_forms(uri: str) -> None:
    with pytest.raises(ValueError, match=r"s3://bucket\[/prefix\], file:///absolute/path"):
        open_store(uri)


# ------------------------------------------------------------------- S3Store, offline


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **kwargs: object) -> list[bytes]:
        return [self.body]


def _reply(status: int, code: str = "", body: bytes | None = None) -> AWSResponse:
    if body is None:
        body = f"<Error><Code>{code}</Code><Message>{code} says no</Message></Error>".encode()
    return AWSResponse("http://offline", status, {"Content-Type": "application/xml"}, _Raw(body))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> S3Store:
    for name in ["AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDUNITTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-secret-value")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    # Port 9 (discard) is never contacted: every request is answered by a hook.
    return S3Store(
        "bkt", "pre", endpoint_url="http://127.0.0.1:9", region="us-east-1", max_attempts=1
    )


def _answer(store: S3Store, event: str, response: AWSResponse) -> list:
    seen: list = []

    def handler(request, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(request)
        return response

    store.client.meta.events.register(f"before-send.s3.{event}", handler)
    return seen


def test_s3_client_config(offline: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    config = offline.client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 1}
    assert config.s3 == {"addressing_style": "path"}
    assert offline.client.meta.endpoint_url == "http://127.0.0.1:9"

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert S3Store("b").endpoint_url == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert S3Store("b").endpoint_url == "http://s3-specific:2"
    assert S3Store("b", endpoint_url="http://explicit:3").endpoint_url == "http://explicit:3"


def test_s3_put_sends_checksum_and_condition(offline: S3Store) -> None:
    seen = _answer(offline, "PutObject", _reply(200, body=b""))

    uri = offline.put("k/v.json", b"{}", content_type="application/json", if_absent=True)
    offline.put("k/w", b"plain")

    assert uri == "s3://bkt/pre/k/v.json"
    conditional, plain = seen
    assert conditional.url.endswith("/bkt/pre/k/v.json")  # path-style addressing
    assert conditional.headers["If-None-Match"] == b"*"
    assert conditional.headers["Content-Type"] == b"application/json"
    assert "If-None-Match" not in plain.headers
    for request, body in zip(seen, [b"{}", b"plain"], strict=True):
        headers = {k.lower(): v for k, v in request.headers.items()}
        assert headers["x-amz-sdk-checksum-algorithm"] == b"SHA256"
        assert headers["x-amz-checksum-sha256"] == base64.b64encode(hashlib.sha256(body).digest())


@pytest.mark.parametrize(("env", "option", "sha256"), [
    (None, None, True), ("when_supported", None, True), ("when_required", None, False),
    (None, "when_required", False), ("when_required", "when_supported", True)])
def test_s3_put_checksum_follows_the_checksum_setting(
    offline: S3Store, monkeypatch: pytest.MonkeyPatch, env: str | None, option: str | None,
    sha256: bool,
) -> None:
    # GCS interoperability, R2 and others refuse checksum headers: "when_required" (the
    # variable, or the store's option, which wins) sends none on a put.
    if env:
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", env)
    else:
        monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    s = S3Store("bkt", endpoint_url="http://127.0.0.1:9", region="us-east-1", max_attempts=1,
                checksums=option)
    seen = _answer(s, "PutObject", _reply(200, body=b""))

    s.put("k", b"body", if_absent=True)

    headers = {k.lower(): v for k, v in seen[0].headers.items()}
    checksum_headers = sorted(k for k in headers if "checksum" in k)
    if sha256:
        assert checksum_headers == ["x-amz-checksum-sha256", "x-amz-sdk-checksum-algorithm"]
        assert headers["x-amz-checksum-sha256"] == base64.b64encode(
            hashlib.sha256(b"body").digest())
    else:
        assert checksum_headers == []
    assert headers["if-none-match"] == b"*"


def test_s3_checksum_option_is_checked() -> None:
    with pytest.raises(ValueError, match="when_supported or when_required, got 'never'"):
        S3Store("bkt", checksums="never")  # type: ignore[arg-type]


def test_s3_conditional_conflicts(offline: S3Store) -> None:
    # 412: the key is there, for good. 409: another conditional write to it was still in
    # progress; a retry finds the key stored or stores it, so it is transient.
    from tasks.retries import is_transient

    _answer(offline, "PutObject", _reply(412, "PreconditionFailed"))
    with pytest.raises(ObjectExistsError, match="s3://bkt/pre/k") as exists:
        offline.put("k", b"x", if_absent=True)
    assert not is_transient(exists.value)

    s = S3Store("bkt", "pre", endpoint_url="http://127.0.0.1:9", region="us-east-1",
                max_attempts=1)
    _answer(s, "PutObject", _reply(409, "ConditionalRequestConflict"))
    with pytest.raises(StorageError, match="ConditionalRequestConflict") as conflict:
        s.put("k", b"x", if_absent=True)
    assert not isinstance(conflict.value, ObjectExistsError)
    assert is_transient(conflict.value)


def test_s3_missing_bucket_names_bucket_and_endpoint(offline: S3Store) -> None:
    _answer(offline, "PutObject", _reply(404, "NoSuchBucket"))
    with pytest.raises(
        StorageError, match=re.escape("bucket 'bkt' does not exist at http://127.0.0.1:9")
    ):
        offline.put("k", b"x")


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"])
def test_s3_refused_credentials_say_what_to_check(offline: S3Store, code: str) -> None:
    _answer(offline, "GetObject", _reply(403, code))
    with pytest.raises(StorageError) as info:
        offline.get("k")
    message = str(info.value)
    assert "credentials were refused by http://127.0.0.1:9" in message
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message
    assert "unit-secret-value" not in message
    assert not isinstance(info.value, MissingObjectError)


def test_s3_missing_key_and_head(offline: S3Store) -> None:
    _answer(offline, "GetObject", _reply(404, "NoSuchKey"))
    _answer(offline, "HeadObject", _reply(404, body=b""))
    with pytest.raises(MissingObjectError, match="no object at s3://bkt/pre/gone"):
        offline.get("gone")
    assert offline.exists("gone") is False


def test_s3_endpoint_credentials_never_reach_messages(offline: S3Store) -> None:
    s = S3Store("bkt", endpoint_url="http://user:hunter2@127.0.0.1:9", max_attempts=1)
    _answer(s, "PutObject", _reply(404, "NoSuchBucket"))
    with pytest.raises(StorageError) as info:
        s.put("k", b"x")
    assert "hunter2" not in str(info.value)
    assert "http://127.0.0.1:9" in str(info.value)


def test_s3_store_pickles_without_its_client(offline: S3Store) -> None:
    assert offline.client is not None
    clone = pickle.loads(pickle.dumps(offline))
    assert clone._client is None
    assert (clone.uri_prefix, clone.endpoint_url) == (offline.uri_prefix, offline.endpoint_url)
    assert clone.client is not offline.client


def test_s3_rejects_bad_keys_before_any_request(offline: S3Store) -> None:
    seen = _answer(offline, "PutObject", _reply(200, body=b""))
    for key in BAD_KEYS:
        with pytest.raises(ValueError):
            offline.put(key, b"x")
    assert seen == []
