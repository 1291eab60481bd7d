"""model.data refuses bad sources with a message naming the problem, and caps what it
reads before it parses it."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data import (
    InvalidInputError,
    load_arrays,
    parquet,
)
from model.data import cifar as cifar_module
from tests.unit.data_files import (
    BATCH_ROWS,
    Py2Pickler,
    batch_dict,
    encode_image,
    random_images,
    random_labels,
    write_cifar_folder,
    write_parquet,
    write_tarball,
)

# ------------------------------------------------------------------------- errors


def test_missing_and_unknown_sources(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"no such file: .*nope.parquet"):
        load_arrays(str(tmp_path / "nope.parquet"), cache_dir=cache)
    with pytest.raises(InvalidInputError, match="no such file"):
        load_arrays((tmp_path / "nope").as_uri(), cache_dir=cache)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InvalidInputError, match=r"cannot tell what kind.*Parquet.*s3://"):
        load_arrays(str(text), cache_dir=cache)
    with pytest.raises(InvalidInputError, match="unsupported URI scheme"):
        load_arrays("http://example.com/x.parquet", cache_dir=cache)
    with pytest.raises(InvalidInputError, match="non-empty string"):
        load_arrays("", cache_dir=cache)


def test_corrupt_parquet(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 but not really a parquet file")
    with pytest.raises(InvalidInputError, match="not a Parquet file"):
        load_arrays(str(bad), cache_dir=cache)


@pytest.mark.parametrize("missing", ["img", "label"])
def test_parquet_missing_column(tmp_path: Path, cache: Path, missing: str) -> None:
    path = write_parquet(tmp_path / "p.parquet", random_images(3, 0))
    table = pq.read_table(path).drop_columns([missing])
    pq.write_table(table, path)
    with pytest.raises(InvalidInputError, match=f"missing column.*`{missing}`"):
        load_arrays(str(path), cache_dir=cache)


def test_parquet_wrong_column_types(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"img": [b"x"], "label": ["cat"]}), path)
    with pytest.raises(InvalidInputError, match="`label` has type string"):
        load_arrays(str(path), cache_dir=cache)
    pq.write_table(pa.table({"img": [1], "label": [0]}), path)
    with pytest.raises(InvalidInputError, match="`img` has type int64"):
        load_arrays(str(path), cache_dir=cache)


def test_undecodable_image_names_the_row(tmp_path: Path, cache: Path) -> None:
    blobs = [encode_image(im, "PNG") for im in random_images(20, 0)]
    blobs[17] = b"\x89PNG\r\n\x1a\n garbage"
    path = write_parquet(tmp_path / "bad.parquet", blobs=blobs)
    with pytest.raises(InvalidInputError, match="row 17: cannot decode image"):
        load_arrays(str(path), cache_dir=cache)
    blobs[17] = b"GIF89a not a png"
    path = write_parquet(tmp_path / "gif.parquet", blobs=blobs)
    with pytest.raises(InvalidInputError, match="row 17: cannot decode image: not a PNG or JPEG"):
        load_arrays(str(path), cache_dir=cache)


def test_truncated_jpeg_names_the_row(tmp_path: Path, cache: Path) -> None:
    blobs = [encode_image(im, "JPEG") for im in random_images(5, 0)]
    blobs[2] = blobs[2][: len(blobs[2]) // 2]
    path = write_parquet(tmp_path / "trunc.parquet", blobs=blobs)
    with pytest.raises(InvalidInputError, match="row 2: cannot decode image"):
        load_arrays(str(path), cache_dir=cache)


def test_wrong_image_size_names_the_row(tmp_path: Path, cache: Path) -> None:
    blobs = [encode_image(im, "PNG") for im in random_images(5, 0)]
    blobs[3] = encode_image(np.zeros((28, 28, 3), np.uint8), "PNG")
    path = write_parquet(tmp_path / "size.parquet", blobs=blobs)
    with pytest.raises(InvalidInputError, match="row 3: image is 28x28, expected 32x32"):
        load_arrays(str(path), cache_dir=cache)


def test_null_image_and_label(tmp_path: Path, cache: Path) -> None:
    blobs = [encode_image(im, "PNG") for im in random_images(3, 0)]
    path = write_parquet(tmp_path / "n.parquet", blobs=[blobs[0], None, blobs[2]])
    with pytest.raises(InvalidInputError, match="row 1: image bytes are missing"):
        load_arrays(str(path), cache_dir=cache)
    table = pq.read_table(write_parquet(tmp_path / "l.parquet", blobs=blobs))
    table = table.set_column(1, "label", pa.array([0, None, 2], pa.int64()))
    pq.write_table(table, tmp_path / "l.parquet")
    with pytest.raises(InvalidInputError, match="row 1: label is missing"):
        load_arrays(str(tmp_path / "l.parquet"), cache_dir=cache)


def test_labels_out_of_range(tmp_path: Path, cache: Path) -> None:
    path = write_parquet(tmp_path / "l.parquet", random_images(4, 0),
                         labels=np.array([0, 9, 10, 1]))
    with pytest.raises(InvalidInputError, match=r"row 2: label 10 is outside 0\.\.9"):
        load_arrays(str(path), cache_dir=cache)
    neg = write_parquet(tmp_path / "n.parquet", random_images(2, 0), labels=np.array([-1, 1]))
    with pytest.raises(InvalidInputError, match="label -1 is outside"):
        load_arrays(str(neg), cache_dir=cache)


def test_batch_labels_out_of_range(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path)
    images = random_images(BATCH_ROWS, 0)
    bad = batch_dict(images, np.full(BATCH_ROWS, 11), "bad")
    (src["folder"] / "data_batch_4").write_bytes(Py2Pickler().dumps(bad))
    with pytest.raises(InvalidInputError, match=r"label 11 is outside 0..9"):
        load_arrays(str(src["folder"]), cache_dir=cache)


def test_empty_parquet(tmp_path: Path, cache: Path) -> None:
    path = write_parquet(tmp_path / "e.parquet", blobs=[], labels=np.array([], np.int64))
    with pytest.raises(InvalidInputError, match="holds no rows"):
        load_arrays(str(path), cache_dir=cache)


def test_empty_batches(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path, rows=0)
    with pytest.raises(InvalidInputError, match="hold no images"):
        load_arrays(str(src["folder"]), cache_dir=cache)


def test_missing_batch_files(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path / "a", skip=("data_batch_3", "batches.meta"))
    with pytest.raises(InvalidInputError, match=r"missing batch file.*data_batch_3, batches.meta"):
        load_arrays(str(src["folder"]), cache_dir=cache)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="cifar-10-python layout"):
        load_arrays(str(empty), cache_dir=cache)
    tarball = write_tarball(src["folder"], tmp_path / "partial.tar.gz")
    with pytest.raises(InvalidInputError, match=r"archive lacks batch file.*data_batch_3"):
        load_arrays(str(tarball), cache_dir=cache)


def test_corrupt_tarball(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00 definitely not gzip")
    with pytest.raises(InvalidInputError, match=r"not a readable .tar.gz"):
        load_arrays(str(path), cache_dir=cache)


def test_malformed_batch(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path)
    batch = src["folder"] / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:-200])
    with pytest.raises(InvalidInputError, match="data_batch_2 is not a valid pickle"):
        load_arrays(str(src["folder"]), cache_dir=cache)
    batch.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(InvalidInputError, match=r"data_batch_2: b'data' has shape \(2, 100\)"):
        load_arrays(str(src["folder"]), cache_dir=cache)


def test_batch_with_a_code_payload_is_refused(tmp_path: Path, cache: Path) -> None:
    sentinel = tmp_path / "SENTINEL"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {sentinel}",))

    src = write_cifar_folder(tmp_path / "src")
    images = random_images(BATCH_ROWS, 0)
    evil = batch_dict(images, random_labels(BATCH_ROWS, 0), "evil") | {b"batch_label": Payload()}
    (src["folder"] / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(InvalidInputError, match=r"refuses to load global posix.system"):
        load_arrays(str(src["folder"]), cache_dir=cache)
    assert not sentinel.exists()


def test_wrong_number_of_class_names(tmp_path: Path, cache: Path) -> None:
    path = write_parquet(tmp_path / "m.parquet", random_images(2, 0), metadata={"classes": "a,b,c"})
    with pytest.raises(InvalidInputError, match="3 class names"):
        load_arrays(str(path), cache_dir=cache)

# -------------------------------------------------------------------------- caps


def _refuse_parsing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The batch `name` reaching the unpickler fails the test: the cap must come first."""
    real = cifar_module.restricted_loads

    def loads(raw: bytes, what: str) -> object:
        assert not what.endswith(name), f"read {what}"
        return real(raw, what)

    monkeypatch.setattr(cifar_module, "restricted_loads", loads)


def test_batch_files_over_the_cap_are_refused_unread(
    cifar: dict, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = write_tarball(cifar["folder"], tmp_path / "cifar-10-python.tar.gz")
    size = (cifar["folder"] / "data_batch_1").stat().st_size
    monkeypatch.setattr(cifar_module, "MAX_MEMBER_BYTES", size - 1)
    _refuse_parsing(monkeypatch, "data_batch_1")
    member = f"member cifar-10-batches-py/data_batch_1 is {size} bytes, more than the limit"
    with pytest.raises(InvalidInputError, match=member):
        load_arrays(str(tarball), cache_dir=cache)
    with pytest.raises(InvalidInputError, match=f"data_batch_1 is {size} bytes, more than"):
        load_arrays(str(cifar["folder"]), cache_dir=cache)


def test_archive_headers_over_the_cap_are_refused(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pax header (a long name) that tarfile would read whole before naming the member.
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/" + "x" * 5000)
        tar.addfile(info, io.BytesIO())
    monkeypatch.setattr(cifar_module, "MAX_MEMBER_BYTES", 4096)
    claims = r"an archive header claims \d+ bytes, more than the limit of 4096"
    with pytest.raises(InvalidInputError, match=claims):
        load_arrays(str(path), cache_dir=cache)


def test_class_names_are_checked_before_they_are_decoded(tmp_path: Path, cache: Path) -> None:
    src = write_cifar_folder(tmp_path)
    long_names = [b"n" * 300] * 10
    (src["folder"] / "batches.meta").write_bytes(pickle.dumps({b"label_names": long_names}))
    with pytest.raises(InvalidInputError, match="a class name is longer than 256 bytes"):
        load_arrays(str(src["folder"]), cache_dir=cache)
    (src["folder"] / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"\xff"] * 10}))
    with pytest.raises(InvalidInputError, match="a class name is not UTF-8"):
        load_arrays(str(src["folder"]), cache_dir=cache)


def test_parquet_rows_are_capped_from_the_footer(
    png_parquet: dict, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet, "ROWS_FLOOR", 59)
    monkeypatch.setattr(parquet, "MIN_ROW_BYTES", 2**40)
    monkeypatch.setattr(parquet, "page_sizes", lambda *a: pytest.fail("read the pages"))
    with pytest.raises(InvalidInputError, match="declares 60 rows, more than the limit of 59"):
        load_arrays(str(png_parquet["path"]), cache_dir=cache)


def test_parquet_image_bytes_are_capped_before_decoding(
    png_parquet: dict, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = png_parquet["path"].stat().st_size
    monkeypatch.setattr(parquet, "decode_images", lambda *a: pytest.fail("decoded"))
    monkeypatch.setattr(parquet, "ENCODED_BYTES_FLOOR", 0)
    monkeypatch.setattr(parquet, "ENCODED_BYTES_PER_FILE_BYTE", 0.5)
    with pytest.raises(InvalidInputError, match=f"more than the limit of {size // 2}"):
        load_arrays(str(png_parquet["path"]), cache_dir=cache)
    # Each image: from the dictionary page where the file has one, else row by row.
    monkeypatch.setattr(parquet, "ENCODED_BYTES_FLOOR", 2**40)
    monkeypatch.setattr(parquet, "MAX_IMAGE_BYTES", 100)
    with pytest.raises(InvalidInputError, match="its dictionary holds an image of"):
        load_arrays(str(png_parquet["path"]), cache_dir=cache)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(png_parquet["path"]), plain, use_dictionary=False)
    with pytest.raises(InvalidInputError, match=r"row 0: the image is \d+ bytes, more than"):
        load_arrays(str(plain), cache_dir=cache)
