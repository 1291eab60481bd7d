"""Two scorings of the same model version on the same input at the same time, against
moto over real HTTP: one set of outputs, byte for byte a single run's, one manifest, and
both runs Completed with that manifest. The writes are conditional (If-None-Match: *),
so of two writers of a key the first one's bytes stay.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import ClientError

import tasks.scoring
from flows.score import ScoreConfig, score

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.usefixtures("prefect_harness")]

WAIT_S = 120  # the most a run waits for the other at a rendezvous


def score_in_threads(scoring, root: str, names: tuple[str, ...],
                     finished: dict[str, threading.Event] | None = None) -> dict[str, Any]:
    """Run `score` once per name, each in a thread of that name: name -> final state.
    `finished[name]`, if given, is set when that run has ended."""
    config = ScoreConfig(input_uri=str(scoring.input_path),
                         output=f"s3://{scoring.bucket}/{root}", tta=False)
    states: dict[str, Any] = {}

    def target(name: str) -> None:
        try:
            states[name] = score(config, return_state=True)
        finally:
            if finished and name in finished:
                finished[name].set()

    threads = [threading.Thread(target=target, args=(n,), name=n) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * WAIT_S)
        assert not t.is_alive(), f"scoring run {t.name} did not finish"
    return states


def test_if_none_match_is_enforced_by_the_endpoint(scoring) -> None:
    key = f"conditional-{uuid.uuid4().hex[:8]}"
    scoring.s3.put_object(Bucket=scoring.bucket, Key=key, Body=b"first", IfNoneMatch="*")

    with pytest.raises(ClientError) as info:
        scoring.s3.put_object(Bucket=scoring.bucket, Key=key, Body=b"second", IfNoneMatch="*")

    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    body = scoring.s3.get_object(Bucket=scoring.bucket, Key=key)["Body"].read()
    assert body == b"first"


def test_two_runs_at_once_make_one_set_of_outputs_identical_to_a_single_run(
    scoring, reference, proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both runs meet before predicting, so both have looked for a manifest, found none,
    # and go on to write every object.
    meet = threading.Barrier(2, timeout=WAIT_S)
    real_predict = tasks.scoring.predict_with_bar

    def predict(*args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        meet.wait()
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(tasks.scoring, "predict_with_bar", predict)
    root = f"race-{uuid.uuid4().hex[:8]}"

    states = score_in_threads(scoring, root, ("run-a", "run-b"))

    assert all(state.is_completed() for state in states.values()), states
    prefix = scoring.prefix(root)
    manifest = reference.assert_matched_by(scoring, scoring.bucket, prefix)
    results = [state.result() for state in states.values()]
    # Both report the one manifest that is stored, the winner's.
    for result in results:
        assert scoring.manifest_of(result) == manifest
        assert result["manifest_uri"] == f"s3://{scoring.bucket}/{prefix}/manifest.json"
    assert sorted(result["reused"] for result in results) == [False, True]
    # Each run sent every object with If-None-Match: one got 200, the other 412.
    for name in ("predictions.csv", "predictions.parquet", "manifest.json"):
        assert sorted(proxy.statuses("PUT", f"{prefix}/{name}")) == [200, 412], name


def test_a_late_run_whose_bytes_differ_leaves_the_first_runs_outputs_intact(
    scoring, reference, proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run b looked for a manifest before run a wrote one, then finished after it, with
    probabilities that differ in the last bits (as on another device): what is stored
    must still be run a's result, described by its manifest."""
    b_checked = threading.Event()
    a_finished = threading.Event()
    real_predict = tasks.scoring.predict_with_bar

    def predict(*args: Any, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        if threading.current_thread().name == "run-a":
            assert b_checked.wait(WAIT_S)
            return real_predict(*args, **kwargs)
        b_checked.set()
        assert a_finished.wait(WAIT_S)
        labels, probs = real_predict(*args, **kwargs)
        return labels, np.nextafter(probs, np.float32(1))  # (N, 10), one ulp up

    monkeypatch.setattr(tasks.scoring, "predict_with_bar", predict)
    root = f"late-{uuid.uuid4().hex[:8]}"

    states = score_in_threads(scoring, root, ("run-a", "run-b"), {"run-a": a_finished})

    assert all(state.is_completed() for state in states.values()), states
    prefix = scoring.prefix(root)
    manifest = reference.assert_matched_by(scoring, scoring.bucket, prefix)
    # run b came after run a had stored everything: each of its writes was refused.
    for name in ("predictions.csv", "predictions.parquet", "manifest.json"):
        assert proxy.statuses("PUT", f"{prefix}/{name}") == [200, 412], name
    assert states["run-a"].result()["reused"] is False
    assert states["run-b"].result()["reused"] is True
    assert scoring.manifest_of(states["run-b"].result()) == manifest
    assert states["run-a"].result()["created_at"] == manifest["created_at"]
