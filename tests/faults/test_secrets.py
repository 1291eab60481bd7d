"""Credentials inside a URI never reach an error line, a flow run's final state (the text
of a failure alert), a log line or an MLflow param: a URI with user-info or a signed query
is refused in one `error:` line that shows it redacted (formerly a raw pyarrow exception
that printed the secret)."""

from __future__ import annotations

import logging
import os

import mlflow
import pytest

from flows.cli import main
from model.data import InvalidInputError, read_competition_pickle
from model.data.uri import redact

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRET"
URIS = {
    "user-info": f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/test.pkl",
    "presigned": "https://bucket.s3.amazonaws.com/test.pkl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                 f"&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&X-Amz-Signature={SECRET}",
    "token in the fragment": f"s3://bucket/test.pkl#{SECRET}",
}


@pytest.mark.parametrize(("uri", "shown"), [
    (URIS["user-info"], "s3://***@bucket/test.pkl"),
    (URIS["presigned"], "https://bucket.s3.amazonaws.com/test.pkl?***"),
    ("http://user:pw@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
    ("s3://bucket/key.pkl", "s3://bucket/key.pkl"),
    ("/state/run?v=1 100%#x/test.pkl", "/state/run?v=1 100%#x/test.pkl"),  # a path, no URI
])
def test_redact(uri, shown):
    assert redact(uri) == shown


@pytest.mark.parametrize("uri", URIS.values(), ids=URIS.keys())
def test_a_uri_with_credentials_is_refused_in_one_redacted_line(uri, state, capsys):
    with pytest.raises(InvalidInputError, match="must not carry credentials"):
        read_competition_pickle(uri)
    for command in (["score", "--input", uri], ["predict", uri]):
        assert main(["--state-dir", str(state), *command]) == 1
        out, err = capsys.readouterr()
        assert SECRET not in out + err
        assert "error: " in err and "must not carry credentials" in err
    lines = main(["--state-dir", str(state), "score", "--input", uri]), capsys.readouterr()
    assert lines[1].err.count("\n") == 1


def test_the_failed_flow_state_and_logs_hold_no_secret(state, prefect_harness, caplog):
    from flows.score import ScoreConfig, score

    os.environ["CIFAR_STATE_DIR"] = str(state)
    with caplog.at_level(logging.DEBUG):
        final = score(ScoreConfig(input_uri=URIS["user-info"]), return_state=True)
    assert final.is_failed()
    assert "must not carry credentials" in final.message  # what an alert quotes
    assert SECRET not in final.message and SECRET not in caplog.text


def test_a_training_flow_logs_its_data_source_redacted(state, prefect_harness):
    from flows.train import TrainResnetsConfig, train

    os.environ["CIFAR_STATE_DIR"] = str(state)
    config = TrainResnetsConfig(variants=["light"], epochs=1, data_source=URIS["user-info"])
    with pytest.raises(InvalidInputError, match="must not carry credentials"):
        train(config)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.params["flow.data_source"] == "s3://***@bucket/test.pkl"
    assert SECRET not in str(run.data.params)


def test_a_tracking_uri_with_a_password_is_shown_redacted(state, capsys, monkeypatch,
                                                          free_port):
    monkeypatch.setenv("CIFAR_TRACKING_TIMEOUT_SECONDS", "1")
    for name in ("TIMEOUT", "MAX_RETRIES", "BACKOFF_FACTOR"):  # the command sets them
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{SECRET}@127.0.0.1:{free_port()}")
    assert main(["--state-dir", str(state), "models"]) == 1
    err = capsys.readouterr().err
    assert "http://***@127.0.0.1" in err and SECRET not in err
