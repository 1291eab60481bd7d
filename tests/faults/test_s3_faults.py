"""S3 endpoint faults under the scoring flow and the store: a proxy in front of moto
answers requests with 500/503, cuts uploads off halfway, or loses the answer to them.

Transient faults are absorbed by botocore's bounded retries and the result is the same,
byte for byte, as a run without faults. Faults that do not go away fail the flow in
bounded time and leave nothing under the final keys: no manifest, no data object, and
never a truncated one. What is stored is always read from moto directly, past the proxy.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

import flows.score
import tasks.scoring
from flows.score import ScoreConfig, score
from tasks.storage import S3Store, StorageError

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.usefixtures("prefect_harness")]

MAX_ATTEMPTS = S3Store("b").max_attempts  # botocore's attempts per request
FLOW_ATTEMPTS = tasks.scoring.write_predictions.retries + 1  # tries of write-predictions
BOUND_S = 60  # a flow facing a dead endpoint must give up within this


def run(scoring, root: str):
    """Score the input into s3://<bucket>/<root>: (final state, seconds taken)."""
    config = ScoreConfig(input_uri=str(scoring.input_path),
                         output=f"s3://{scoring.bucket}/{root}", tta=False)
    started = time.monotonic()
    state = score(config, return_state=True)
    return state, time.monotonic() - started


def fresh_root() -> str:
    return f"run-{uuid.uuid4().hex[:8]}"


def objects(scoring, prefix: str) -> list[str]:
    listing = scoring.s3.list_objects_v2(Bucket=scoring.bucket, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


# ------------------------------------------------------------------ transient faults


@pytest.mark.parametrize("status", [503, 500])
def test_first_requests_failing_are_retried_and_the_result_is_unchanged(
    scoring, reference, proxy, status: int
) -> None:
    root = fresh_root()
    proxy.fail_next(3, status)

    state, _ = run(scoring, root)

    assert state.is_completed(), state
    assert proxy.counts[str(status)] == 3
    # The first three requests (the manifest lookup and its retries) were the ones hit.
    assert [(s.method, s.status) for s in proxy.seen[:4]] == [("HEAD", status)] * 3 + [
        ("HEAD", 404)]
    manifest = reference.assert_matched_by(scoring, scoring.bucket, scoring.prefix(root))
    assert scoring.manifest_of(state.result()) == manifest


def test_uploads_cut_halfway_are_retried_and_leave_complete_objects(
    scoring, reference, proxy
) -> None:
    root = fresh_root()
    proxy.drop_puts(times=2)

    state, _ = run(scoring, root)

    assert state.is_completed(), state
    assert proxy.counts["dropped"] == 2
    # Both cuts hit the first data object; its third attempt went through whole.
    csv = f"{scoring.prefix(root)}/predictions.csv"
    assert [s.outcome for s in proxy.seen if s.method == "PUT" and s.path.endswith(csv)] == [
        "dropped", "dropped", "passed"]
    reference.assert_matched_by(scoring, scoring.bucket, scoring.prefix(root))


def test_uploads_whose_answer_is_lost_are_recognised_as_this_runs_own(
    scoring, reference, proxy
) -> None:
    # Every object is stored, but the client never hears so; its retry, conditional
    # like the first try, is refused (412) by its own first attempt.
    root = fresh_root()
    proxy.lose_responses(methods={"PUT"})

    state, _ = run(scoring, root)

    assert state.is_completed(), state
    prefix = scoring.prefix(root)
    for name in ("predictions.csv", "predictions.parquet", "manifest.json"):
        assert proxy.statuses("PUT", f"{prefix}/{name}") == [None, 412], name
    manifest = reference.assert_matched_by(scoring, scoring.bucket, prefix)
    result = state.result()
    assert result["reused"] is False  # the stored manifest is this run's, not another's
    assert result["created_at"] == manifest["created_at"]


def test_a_conditional_request_conflict_is_retried_and_the_result_is_unchanged(
    scoring, reference, proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 409: another conditional write to the key was still in progress. Not "the object
    # exists": the task's retry writes it.
    monkeypatch.setattr(flows.score, "write_predictions",
                        tasks.scoring.write_predictions.with_options(retry_delay_seconds=0))
    root = fresh_root()
    proxy.fail_next(1, 409, methods={"PUT"})

    state, _ = run(scoring, root)

    assert state.is_completed(), state
    prefix = scoring.prefix(root)
    assert proxy.statuses("PUT", f"{prefix}/predictions.csv") == [409, 200]
    reference.assert_matched_by(scoring, scoring.bucket, prefix)
    assert state.result()["reused"] is False


# ------------------------------------------------------------------ lasting faults


@pytest.mark.parametrize("fault", ["every request", "every PUT"])
def test_a_lasting_fault_fails_the_flow_in_bounded_time_and_leaves_nothing(
    scoring, proxy, fault: str
) -> None:
    root = fresh_root()
    proxy.fail_all(500, methods={"PUT"} if fault == "every PUT" else None)

    state, elapsed = run(scoring, root)

    assert state.is_failed(), state
    assert elapsed < BOUND_S
    error = state.result(raise_on_failure=False)
    assert isinstance(error, StorageError), error
    assert "kept failing" in str(error) and f"after {MAX_ATTEMPTS} attempts" in str(error)
    if fault == "every request":
        # The manifest lookup gave up after botocore's attempts; nothing was written.
        assert [s.method for s in proxy.seen] == ["HEAD"] * MAX_ATTEMPTS
    else:
        # The first data object failed every attempt of every task try; nothing followed.
        puts = [s for s in proxy.seen if s.method == "PUT"]
        assert len(puts) == MAX_ATTEMPTS * FLOW_ATTEMPTS == proxy.counts["500"]
        assert {s.path for s in puts} == {
            f"/{scoring.bucket}/{scoring.prefix(root)}/predictions.csv"}
    # No manifest, and no object at all (so no partial one) under the final prefix.
    assert objects(scoring, f"{root}/") == []


def test_uploads_cut_every_time_fail_the_flow_and_leave_no_truncated_object(
    scoring, proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The time bound is the test above's; here only what is left behind matters, so the
    # task retries come without their 2 s and 10 s pauses.
    monkeypatch.setattr(flows.score, "write_predictions",
                        tasks.scoring.write_predictions.with_options(retry_delay_seconds=0))
    root = fresh_root()
    proxy.drop_puts()

    state, _ = run(scoring, root)

    assert state.is_failed(), state
    error = state.result(raise_on_failure=False)
    assert isinstance(error, StorageError), error
    assert "Connection was closed before we received a valid response" in str(error)
    assert "broke off during put" in str(error) and "cannot reach" not in str(error)
    puts = [s for s in proxy.seen if s.method == "PUT"]
    assert len(puts) == MAX_ATTEMPTS * FLOW_ATTEMPTS == proxy.counts["dropped"]
    assert all(s.body_bytes == s.declared_bytes // 2 > 0 for s in puts)  # half reached moto
    assert objects(scoring, f"{root}/") == []


# ------------------------------------------------------------------ the store alone

SIZE = 4 * 1024 * 1024  # bytes: several TCP windows, so the cut lands mid-stream


@pytest.fixture
def store(scoring, proxy) -> S3Store:
    return S3Store(scoring.bucket, f"store-{uuid.uuid4().hex[:8]}", endpoint_url=proxy.url)


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payload") / "blob.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.mark.parametrize("how", ["put", "put_file"])
def test_store_upload_cut_halfway_is_retried_to_a_complete_object(
    scoring, proxy, store: S3Store, payload: Path, how: str
) -> None:
    data = payload.read_bytes()
    proxy.drop_puts(times=2)

    if how == "put":
        store.put("blob.bin", data)
    else:
        store.put_file("blob.bin", payload)

    puts = [s for s in proxy.seen if s.method == "PUT"]
    assert [s.outcome for s in puts] == ["dropped", "dropped", "passed"]
    assert all(s.body_bytes == s.declared_bytes // 2 == SIZE // 2 for s in puts[:2])
    key = f"{store.prefix}/blob.bin"
    head = scoring.s3.head_object(Bucket=scoring.bucket, Key=key)
    assert head["ContentLength"] == SIZE
    stored = scoring.s3.get_object(Bucket=scoring.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("checksums", [None, "when_required"])
def test_store_sends_sha256_unless_checksums_are_only_when_required(
    scoring, proxy, monkeypatch: pytest.MonkeyPatch, checksums: str | None
) -> None:
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    store = S3Store(scoring.bucket, f"sum-{uuid.uuid4().hex[:8]}", endpoint_url=proxy.url,
                    checksums=checksums)

    store.put("a.bin", b"payload", if_absent=True)

    assert store.get("a.bin") == b"payload"
    head = scoring.s3.head_object(Bucket=scoring.bucket, Key=f"{store.prefix}/a.bin",
                                  ChecksumMode="ENABLED")
    expected = base64.b64encode(hashlib.sha256(b"payload").digest()).decode()
    assert head.get("ChecksumSHA256") == (None if checksums else expected)


@pytest.mark.parametrize("if_absent", [False, True])
def test_store_upload_cut_every_time_raises_and_stores_nothing(
    scoring, proxy, store: S3Store, payload: Path, if_absent: bool
) -> None:
    proxy.drop_puts()

    with pytest.raises(StorageError, match=rf"connection to S3 endpoint .* broke off during "
                       rf"put s3://{scoring.bucket}/{store.prefix}/blob\.bin, after "
                       rf"{MAX_ATTEMPTS} attempts"):
        store.put("blob.bin", payload.read_bytes(), if_absent=if_absent)

    assert proxy.counts["dropped"] == MAX_ATTEMPTS
    with pytest.raises(ClientError) as info:
        scoring.s3.head_object(Bucket=scoring.bucket, Key=f"{store.prefix}/blob.bin")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
