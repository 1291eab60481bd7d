"""model.data reading training sources and the competition file from S3: moto's S3 server
over real HTTP (the `moto_endpoint` fixture of tests/conftest.py).

The files are written in their real formats by the unit tests' writers.
"""

from __future__ import annotations

import pickle
import re
import types
from pathlib import Path

import boto3
import numpy as np
import pytest

from model import data
from model.data import InvalidInputError, load_arrays, load_dataset
from tests.unit.data_files import write_cifar_folder, write_parquet, write_tarball

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def local(tmp_path: Path) -> types.SimpleNamespace:
    """Sources on local disk to upload (a cifar-10-python folder, a PNG Parquet file) and
    a decode cache."""
    return types.SimpleNamespace(cifar=write_cifar_folder(tmp_path / "src"),
                                 parquet=write_parquet(tmp_path / "train.parquet",
                                                       _images(60, 7), fmt="PNG"),
                                 cache=tmp_path / "cache")


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    bucket = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:50].strip("-")
    client.create_bucket(Bucket=bucket)
    return types.SimpleNamespace(client=client, bucket=bucket)


def test_s3_parquet_and_tarball(s3, local, tmp_path: Path) -> None:
    png_parquet, cifar, cache = local.parquet, local.cifar, local.cache
    tarball = write_tarball(cifar["folder"], tmp_path / "cifar-10-python.tar.gz")
    s3.client.upload_file(str(png_parquet), s3.bucket, "sets/train.parquet")
    s3.client.upload_file(str(tarball), s3.bucket, "sets/cifar-10-python.tar.gz")

    parquet = load_dataset(f"s3://{s3.bucket}/sets/train.parquet", val_size=10, cache_dir=cache)
    local = load_arrays(str(png_parquet), cache_dir=cache)
    assert parquet.digest == local.digest and len(parquet.train) == 50
    from_tar = load_arrays(f"s3://{s3.bucket}/sets/cifar-10-python.tar.gz", cache_dir=cache)
    assert from_tar.digest == load_arrays(str(cifar["folder"]), cache_dir=cache).digest


def test_s3_copy_is_reused_until_the_object_changes(s3, local) -> None:
    png_parquet, cache = local.parquet, local.cache
    uri = f"s3://{s3.bucket}/train.parquet"
    s3.client.upload_file(str(png_parquet), s3.bucket, "train.parquet")
    first = load_arrays(uri, cache_dir=cache)
    (copy,) = (cache / "s3").glob("*/train.parquet")
    stamp = copy.stat().st_mtime_ns
    assert load_arrays(uri, cache_dir=cache).digest == first.digest
    assert copy.stat().st_mtime_ns == stamp

    images = _images(30, 99)
    changed = write_parquet(png_parquet.parent / "changed.parquet", images)
    s3.client.upload_file(str(changed), s3.bucket, "train.parquet")
    second = load_arrays(uri, cache_dir=cache)
    np.testing.assert_array_equal(second.train_images, images)


def test_s3_errors(s3, local, closed_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = local.cache
    with pytest.raises(InvalidInputError, match="no such file: s3://"):
        load_arrays(f"s3://{s3.bucket}/absent.parquet", cache_dir=cache)
    with pytest.raises(InvalidInputError, match="no such file"):
        load_arrays("s3://no-such-bucket-here/x.parquet", cache_dir=cache)
    s3.client.put_object(Bucket=s3.bucket, Key="dir/a.parquet", Body=b"x")
    with pytest.raises(InvalidInputError, match="is a folder"):
        load_arrays(f"s3://{s3.bucket}/dir", cache_dir=cache)
    with pytest.raises(InvalidInputError, match="not an s3://bucket/key"):
        load_arrays("s3://only-bucket", cache_dir=cache)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed_endpoint)
    with pytest.raises(InvalidInputError, match=r"cannot reach s3://.*AWS_ENDPOINT_URL_S3"):
        load_arrays(f"s3://{s3.bucket}/x.parquet", cache_dir=cache)


def test_s3_endpoint_falls_back_to_aws_endpoint_url(
    s3, local, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    png_parquet, cache = local.parquet, local.cache
    s3.client.upload_file(str(png_parquet), s3.bucket, "t.parquet")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    assert len(load_arrays(f"s3://{s3.bucket}/t.parquet", cache_dir=cache).train_labels) == 60


def test_competition_pickle_from_s3(s3) -> None:
    ids = np.arange(5, dtype=np.int64)
    images = _images(5, 1)
    body = pickle.dumps({b"data": images, b"ids": ids}, protocol=4)
    s3.client.put_object(Bucket=s3.bucket, Key="in/test.pkl", Body=body)
    got_ids, got_images = data.read_competition_pickle(f"s3://{s3.bucket}/in/test.pkl")
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_images, images)
    with pytest.raises(InvalidInputError, match="more than the limit"):
        data.read_competition_pickle(f"s3://{s3.bucket}/in/test.pkl", max_bytes=len(body) - 1)
    with pytest.raises(InvalidInputError, match="no such file"):
        data.read_competition_pickle(f"s3://{s3.bucket}/in/absent.pkl")
