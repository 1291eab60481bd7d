"""load-data against S3 through the fault-injecting proxy: a transient error (503,
500) is retried with the scoring writes' policy and the data loads; a permanent one (a
missing object, bad data) fails at once, without a retry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from s3_proxy import FaultProxy

from model.config import DataConfig
from model.data import InvalidInputError, SourceUnavailableError
from tasks.data import load_data
from tasks.settings import Settings

BUCKET = "data"
ROWS = 200


@pytest.fixture(scope="module")
def uploaded(moto_endpoint: str, shared_parquet: Path, tmp_path_factory) -> str:
    """200 rows of the shared Parquet, and a file that is not Parquet, in moto."""
    small = tmp_path_factory.mktemp("data") / "small.parquet"
    pq.write_table(pq.read_table(shared_parquet).slice(0, ROWS), small)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(small), BUCKET, "train.parquet")
    s3.put_object(Bucket=BUCKET, Key="broken.parquet", Body=b"PAR1 but not really")
    return moto_endpoint


@pytest.fixture
def attempts(monkeypatch) -> list[str]:
    """The sources load-data tried to load, one entry per attempt."""
    seen: list[str] = []
    real = DataConfig.load

    def counting(self, source=None, cache_dir=None, shared_cache=None):
        seen.append(source)
        return real(self, source, cache_dir, shared_cache)

    monkeypatch.setattr(DataConfig, "load", counting)
    return seen


def _prepare(tmp_path: Path, key: str, proxy: FaultProxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    settings = dataclasses.replace(Settings.from_env(tmp_path / "state"),
                                   cache_dir=tmp_path / "cache")
    task = load_data.with_options(retry_delay_seconds=0)
    return task(settings, DataConfig(data_source=f"s3://{BUCKET}/{key}", val_size=50))


def test_a_throttled_endpoint_is_retried_and_the_data_loads(
        uploaded, proxy, attempts, tmp_path, monkeypatch, prefect_harness):
    proxy.fail_next(2, 503)
    data = _prepare(tmp_path, "train.parquet", proxy, monkeypatch)
    assert len(data.train) + len(data.val) == ROWS
    assert len(attempts) == 3  # two failed attempts, each one 503, then the load
    assert [s.outcome for s in proxy.seen][:2] == ["503", "503"]


def test_an_endpoint_that_stays_broken_fails_after_the_retries(
        uploaded, proxy, attempts, tmp_path, monkeypatch, prefect_harness):
    proxy.fail_all(500)
    with pytest.raises(SourceUnavailableError, match=r"cannot reach s3://data/train\.parquet"):
        _prepare(tmp_path, "train.parquet", proxy, monkeypatch)
    assert len(attempts) == 3


@pytest.mark.parametrize(("key", "message"), [("absent.parquet", "no such file"),
                                              ("broken.parquet", "broken.parquet")])
def test_a_missing_object_or_bad_data_is_not_retried(
        uploaded, proxy, attempts, tmp_path, monkeypatch, prefect_harness, key, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        _prepare(tmp_path, key, proxy, monkeypatch)
    assert not isinstance(info.value, SourceUnavailableError)
    assert len(attempts) == 1
