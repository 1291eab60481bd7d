"""The official cifar-10-python layout: a folder of pickled batches, or its .tar.gz.

Every batch goes through the restricted unpickler. An official batch file is 31 MB, so
no file or archive member may exceed MAX_MEMBER_BYTES; an archive's member sizes are
checked from their headers before their data is read, and each member is parsed as it
arrives, so that at most one is held unparsed.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

from model.data.arrays import InvalidInputError, RawData, check_label_range, class_names, clip
from model.data.unpickle import restricted_loads

BATCH_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"
BATCH_FILES = (*_TRAIN_BATCHES, _TEST_BATCH, _META)

# Twice an official batch (10,000 images, 31 MB): larger is not a CIFAR-10 batch, and
# refusing it before reading bounds what one member can cost.
MAX_MEMBER_BYTES = 64 * 2**20
# Class names in batches.meta are single words; checked before they are decoded, since one
# long name referenced ten times would be decoded ten times.
_MAX_NAME_BYTES = 256
_COMPRESSED = (
    (b"\x1f\x8b", gzip.GzipFile),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)


def _batch_labels(values: Any, n: int, what: str) -> np.ndarray:
    if isinstance(values, np.ndarray):
        labels = values
    elif isinstance(values, list | tuple) and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values
    ):
        try:
            labels = np.array(values, dtype=np.int64)
        except OverflowError:
            raise InvalidInputError(f"{what}: b'labels' has a value outside int64") from None
    else:
        raise InvalidInputError(f"{what}: b'labels' must be a list of integers")
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise InvalidInputError(f"{what}: b'labels' must be a 1-D integer sequence")
    if len(labels) != n:
        raise InvalidInputError(f"{what}: {n} images but {len(labels)} labels")
    return labels.astype(np.int64)


def _parse_batch(raw: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    obj = restricted_loads(raw, what)
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{what}: expected a dict with b'data' and b'labels'")
    # Python 2 wrote the keys as str, which arrive here as bytes; Python 3 copies use str.
    batch = {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    data = batch.get("data")
    if "labels" not in batch or data is None:
        raise InvalidInputError(f"{what}: expected keys b'data' and b'labels'")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise InvalidInputError(f"{what}: b'data' must be a uint8 array of shape (N, 3072)")
    if data.shape[1] != 32 * 32 * 3:
        raise InvalidInputError(f"{what}: b'data' has shape {data.shape}, expected (N, 3072)")
    labels = _batch_labels(batch["labels"], len(data), what)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    return np.ascontiguousarray(images), labels


def _parse_meta(raw: bytes, what: str) -> tuple[str, ...]:
    obj = restricted_loads(raw, what)
    names = None
    if isinstance(obj, dict):
        names = obj.get(b"label_names", obj.get("label_names"))
    if not isinstance(names, list | tuple) or not all(isinstance(n, bytes | str) for n in names):
        raise InvalidInputError(f"{what}: expected a dict with b'label_names', a list of names")
    if any(len(n) > _MAX_NAME_BYTES for n in names):
        raise InvalidInputError(f"{what}: a class name is longer than {_MAX_NAME_BYTES} bytes")
    try:
        return class_names([n.decode() if isinstance(n, bytes) else n for n in names], what)
    except UnicodeDecodeError:
        raise InvalidInputError(f"{what}: a class name is not UTF-8 text") from None


def _parse_member(name: str, raw: bytes, what: str) -> Any:
    return _parse_meta(raw, what) if name == _META else _parse_batch(raw, what)


def _assemble(parsed: dict[str, Any], what: str) -> RawData:
    classes = parsed[_META]
    train_images = np.concatenate([parsed[name][0] for name in _TRAIN_BATCHES])
    train_labels = np.concatenate([parsed[name][1] for name in _TRAIN_BATCHES])
    test_images, test_labels = parsed[_TEST_BATCH]
    if len(train_labels) == 0:
        raise InvalidInputError(f"{what}: the training batches hold no images")
    check_label_range(train_labels, len(classes), f"{what} training batches")
    check_label_range(test_labels, len(classes), f"{what}/{_TEST_BATCH}")
    return RawData.of(train_images, train_labels, test_images, test_labels, classes)


def _batch_dir(path: Path) -> Path:
    nested = path / BATCH_DIR
    return nested if nested.is_dir() else path


def folder_files(path: Path, source: str) -> list[Path]:
    folder = _batch_dir(path)
    files = [folder / name for name in BATCH_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InvalidInputError(f"{source}: missing batch file(s) {', '.join(missing)} in "
                                f"{folder}; expected the cifar-10-python layout "
                                f"({', '.join(BATCH_FILES)})")
    return files


def _too_big(what: str, size: int) -> InvalidInputError:
    return InvalidInputError(f"{what} is {size} bytes, more than the limit of {MAX_MEMBER_BYTES} "
                             "for one batch file (an official one is 31 MB); refused unread")


def _read_file(path: Path, what: str) -> bytes:
    size = path.stat().st_size
    if size > MAX_MEMBER_BYTES:
        raise _too_big(what, size)
    with path.open("rb") as f:
        raw = f.read(MAX_MEMBER_BYTES + 1)
    if len(raw) > MAX_MEMBER_BYTES:  # grew since the stat
        raise _too_big(what, len(raw))
    return raw


def read_folder(path: Path, source: str) -> RawData:
    files = {f.name: f for f in folder_files(path, source)}
    parsed = {}
    for name in (_META, *_TRAIN_BATCHES, _TEST_BATCH):  # the class names first
        what = f"{source}/{name}"
        parsed[name] = _parse_member(name, _read_file(files[name], what), what)
    return _assemble(parsed, source)


class _CappedReads:
    """The decompressed archive, refusing any single read over MAX_MEMBER_BYTES: tarfile
    reads a member's data, and a pax or GNU long-name header, in one read of the size its
    header claims, before this module sees the member."""

    def __init__(self, raw: BinaryIO, source: str) -> None:
        self._raw = raw
        self._source = source

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > MAX_MEMBER_BYTES:
            raise InvalidInputError(f"{self._source}: an archive header claims {size} bytes, more "
                                    f"than the limit of {MAX_MEMBER_BYTES} for one entry; refused "
                                    "unread")
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def _open_archive(path: Path) -> BinaryIO:
    with path.open("rb") as f:
        head = f.read(6)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return opener(path)
    return path.open("rb")


def read_tarball(path: Path, source: str) -> RawData:
    parsed: dict[str, Any] = {}
    try:
        with _open_archive(path) as stream, tarfile.open(
            fileobj=_CappedReads(stream, source), mode="r:"
        ) as tar:
            # One pass in archive order: seeking back in a gzip stream means decompressing
            # it again from the start.
            for member in tar:
                name = PurePosixPath(member.name).name
                if not member.isfile() or name not in BATCH_FILES:
                    continue
                what = f"{source}/{name}"
                if name in parsed:
                    raise InvalidInputError(f"{source}: the archive holds several {name} files")
                if member.size > MAX_MEMBER_BYTES:
                    raise _too_big(f"{source}: member {clip(member.name)}", member.size)
                f = tar.extractfile(member)
                if f is None:
                    raise InvalidInputError(f"{source}: cannot read {clip(member.name)}")
                parsed[name] = _parse_member(name, f.read(), what)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise InvalidInputError(f"{source} is not a readable .tar.gz: {e}") from e
    missing = [name for name in BATCH_FILES if name not in parsed]
    if missing:
        raise InvalidInputError(f"{source}: the archive lacks batch file(s) {', '.join(missing)}; "
                                "expected the cifar-10-python layout "
                                f"({BATCH_DIR}/{{{', '.join(BATCH_FILES)}}})")
    return _assemble(parsed, source)
