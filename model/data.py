"""CIFAR-10 data: every supported source read into uint8 arrays, digested, cached and split.

Sources: the official cifar-10-python batches (a folder or its .tar.gz), Parquet in the
Hugging Face layout, and torchvision's download, each from a local path, `file://` or
`s3://`. Every array leaves this module as (N, 32, 32, 3) uint8 RGB with int64 labels.

Pickles (the CIFAR batches and the competition file) come from outside the project and
run code when loaded naively, so they only ever go through `_RestrictedUnpickler`, which
can rebuild numpy arrays and nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "CLASSES",
    "Dataset",
    "InvalidInputError",
    "RawData",
    "Split",
    "content_digest",
    "load_arrays",
    "load_dataset",
    "open_uri",
    "read_bytes",
    "read_competition_pickle",
    "stratified_split",
    "write_competition_pickle",
]

CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SHAPE = (32, 32, 3)

_BATCH_DIR = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"
_BATCH_FILES = (*_TRAIN_BATCHES, _TEST_BATCH, _META)

# Bumped whenever the cache layout or the decoding changes, so old entries are rebuilt.
_CACHE_FORMAT = 1
_DEFAULT_CACHE_DIR = "~/.cache/cifar-pipeline"
# Below this many images a process pool costs more to start than it saves.
_PARALLEL_DECODE_MIN_ROWS = 8192
# Beyond this the decode is memory-bound and more processes only add start-up time.
_MAX_DECODE_WORKERS = 8
_COPY_CHUNK = 8 * 2**20
_IMAGE_FORMATS = ("PNG", "JPEG")

_ACCEPTED_SOURCES = (
    "accepted sources: a cifar-10-python folder (data_batch_1..5, test_batch, batches.meta), "
    "its .tar.gz, a Parquet file with columns `img` (PNG/JPEG bytes) and `label`, or "
    "'torchvision[:root]'; files as a local path, file:// or s3:// URI"
)

_log = logging.getLogger(__name__)


class InvalidInputError(ValueError):
    """Any problem with a data source or competition file; the message says what is wrong
    and, where possible, how to fix it."""


# --------------------------------------------------------------------------- containers


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 hex over a small header (shape, dtype), the pixel bytes and the int64 label bytes."""
    images = np.ascontiguousarray(images)
    labels = np.ascontiguousarray(labels, dtype="<i8")
    h = hashlib.sha256()
    # The header keeps (2, 32, 32, 3) and (4, 16, 32, 3) of the same bytes apart.
    h.update(f"cifar-content-v1 {images.shape} {images.dtype.str} {labels.shape}\n".encode())
    h.update(images.reshape(-1).view(np.uint8))
    h.update(labels.view(np.uint8))
    return h.hexdigest()


def _source_digest(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray | None,
    test_labels: np.ndarray | None,
) -> str:
    train = content_digest(train_images, train_labels)
    if test_images is None or test_labels is None:
        # A train-only source is digested exactly like a Split of the same rows.
        return train
    test = content_digest(test_images, test_labels)
    return hashlib.sha256(f"cifar-source-v1\ntrain {train}\ntest {test}\n".encode()).hexdigest()


def _check_arrays(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidInputError(f"{what}: images must be a uint8 numpy array")
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise InvalidInputError(
            f"{what}: images have shape {images.shape}, expected (N, 32, 32, 3)"
        )
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
        raise InvalidInputError(f"{what}: labels must be a 1-D int64 numpy array")
    if len(labels) != len(images):
        raise InvalidInputError(f"{what}: {len(images)} images but {len(labels)} labels")


@dataclass(frozen=True, eq=False)
class Split:
    """Rows of one split; `eq=False` because element-wise array equality has no truth value."""

    images: np.ndarray  # (N, 32, 32, 3) uint8 RGB, C-contiguous
    labels: np.ndarray  # (N,) int64 in 0..9

    def __post_init__(self) -> None:
        _check_arrays(self.images, self.labels, "Split")
        if not self.images.flags.c_contiguous:
            object.__setattr__(self, "images", np.ascontiguousarray(self.images))

    def __len__(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def digest(self) -> str:
        return content_digest(self.images, self.labels)


@dataclass(frozen=True, eq=False)
class RawData:
    """A source as read, before any validation split."""

    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray | None  # (M, 32, 32, 3) uint8, for sources with an official test
    test_labels: np.ndarray | None
    classes: tuple[str, ...]
    digest: str


@dataclass(frozen=True, eq=False)
class Dataset:
    train: Split
    val: Split
    test: Split | None  # the source's official test split, where it has one
    classes: tuple[str, ...]
    digest: str  # of the whole source (all train and test rows) before splitting
    source: str  # as given


# ------------------------------------------------------------------------------ splitting


def _stratified_pick(
    labels: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(rest, picked): k rows drawn per class in proportion, largest-remainder rounding."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * k / len(labels)
    quota = np.floor(exact).astype(np.int64)
    short = k - int(quota.sum())
    # Stable sort: equal remainders go to the lower class id, so the result is reproducible.
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:short]] += 1
    picked = []
    for cls, q in zip(classes, quota, strict=True):
        rows = np.flatnonzero(labels == cls)
        picked.append(rng.permutation(rows)[:q])
    picked_idx = np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[picked_idx] = False
    return np.flatnonzero(mask).astype(np.int64), picked_idx.astype(np.int64)


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx), disjoint, covering all rows, deterministic for a seed, each
    class represented in val in proportion (largest-remainder rounding so the sizes sum to
    val_size). Both index arrays are sorted. val_size=0 gives an empty val."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InvalidInputError(f"labels must be 1-D, got shape {labels.shape}")
    if isinstance(val_size, bool) or not isinstance(val_size, int | np.integer) or val_size < 0:
        raise InvalidInputError(f"val_size must be a non-negative integer, got {val_size!r}")
    n = len(labels)
    if val_size >= n:
        raise InvalidInputError(
            f"val_size={val_size} leaves no training rows out of {n}; pass a smaller val_size"
        )
    if val_size == 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    return _stratified_pick(labels, int(val_size), np.random.default_rng(seed))


def _subset(split: Split, train_size: int, seed: int) -> Split:
    n = len(split)
    if isinstance(train_size, bool) or not isinstance(train_size, int | np.integer):
        raise InvalidInputError(f"train_size must be an integer or None, got {train_size!r}")
    if train_size <= 0 or train_size > n:
        raise InvalidInputError(
            f"train_size={train_size} is outside 1..{n}, the training rows left after the "
            "validation hold-out; pass a smaller train_size or None for all"
        )
    if train_size == n:
        return split
    # A seed stream of its own, so that the subset does not echo the validation draw.
    _, keep = _stratified_pick(split.labels, int(train_size), np.random.default_rng((seed, 1)))
    return Split(split.images[keep], split.labels[keep])


def load_dataset(
    source: str | os.PathLike[str],
    *,
    val_size: int = 5000,
    seed: int = 0,
    train_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """The one entry point: read `source`, hold out a stratified validation split of
    `val_size` rows, and optionally keep a stratified subset of `train_size` training rows
    (after the hold-out, so the validation rows do not depend on it) for smoke tests and
    quick profiles; None keeps all."""
    source = os.fspath(source)
    raw = load_arrays(source, cache_dir=cache_dir)
    train_idx, val_idx = stratified_split(raw.train_labels, val_size, seed)
    train = Split(raw.train_images[train_idx], raw.train_labels[train_idx])
    val = Split(raw.train_images[val_idx], raw.train_labels[val_idx])
    if train_size is not None:
        train = _subset(train, train_size, seed)
    test = None
    if raw.test_images is not None and raw.test_labels is not None:
        test = Split(raw.test_images, raw.test_labels)
    return Dataset(
        train=train, val=val, test=test, classes=raw.classes, digest=raw.digest, source=source
    )


# ------------------------------------------------------------------------------ URIs


def _s3_filesystem() -> Any:
    from pyarrow import fs

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    kwargs: dict[str, Any] = {
        "region": region,
        "connect_timeout": 10.0,
        # No retries here: retry policy belongs to the task layer, which knows what is transient.
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=1),
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    return fs.S3FileSystem(**kwargs)


def _s3_path(uri: str) -> str:
    parsed = urlparse(uri)
    key = parsed.path.lstrip("/")
    if not parsed.netloc or not key:
        raise InvalidInputError(f"{uri} is not an s3://bucket/key URI")
    return f"{parsed.netloc}/{key}"


def _s3_info(uri: str) -> tuple[Any, str, Any]:
    """(filesystem, bucket/key, FileInfo) of an existing S3 object."""
    from pyarrow import fs

    s3 = _s3_filesystem()
    path = _s3_path(uri)
    try:
        info = s3.get_file_info(path)
    except OSError as e:
        raise InvalidInputError(
            f"cannot reach {uri}: {e}; check AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) and the "
            "AWS credentials"
        ) from e
    if info.type == fs.FileType.NotFound:
        raise InvalidInputError(f"no such file: {uri}")
    if info.type != fs.FileType.File:
        raise InvalidInputError(f"{uri} is a folder, not a file; name one object: s3://bucket/key")
    return s3, path, info


def _local_path(uri: str | os.PathLike[str]) -> Path | None:
    """The local path a URI names, or None for s3://. Raises for other schemes."""
    if isinstance(uri, os.PathLike):
        return Path(uri)
    if uri.startswith("s3://"):
        return None
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidInputError(
                f"{uri}: file:// URIs must name a local path (file:///abs/path)"
            )
        return Path(unquote(parsed.path))
    if "://" in uri:
        raise InvalidInputError(
            f"{uri}: unsupported URI scheme; use a local path, file:// or s3://"
        )
    return Path(uri).expanduser()


def _uri_size(uri: str | os.PathLike[str]) -> int:
    path = _local_path(uri)
    if path is None:
        return int(_s3_info(str(uri))[2].size)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidInputError(f"no such file: {uri}") from None
    except OSError as e:
        raise InvalidInputError(f"cannot read {uri}: {e}") from e
    if not path.is_file():
        raise InvalidInputError(f"{uri} is not a file")
    return st.st_size


def open_uri(uri: str | os.PathLike[str]) -> BinaryIO:
    """A readable binary file object for a local path, file:// or s3:// URI."""
    path = _local_path(uri)
    if path is None:
        s3, key, _ = _s3_info(str(uri))
        try:
            return s3.open_input_stream(key)
        except OSError as e:
            raise InvalidInputError(f"cannot read {uri}: {e}") from e
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InvalidInputError(f"no such file: {uri}") from None
    except OSError as e:
        raise InvalidInputError(f"cannot read {uri}: {e}") from e


def read_bytes(uri: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
    """The whole content of a local path, file:// or s3:// URI, refusing more than max_bytes."""
    if max_bytes is not None:
        size = _uri_size(uri)
        if size > max_bytes:
            raise InvalidInputError(_too_big(uri, size, max_bytes))
    with open_uri(uri) as f:
        try:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        except OSError as e:
            raise InvalidInputError(f"cannot read {uri}: {e}") from e
    # The size can change between stat and read; the cap holds either way.
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidInputError(_too_big(uri, len(data), max_bytes))
    return data


def _too_big(uri: str | os.PathLike[str], size: int, max_bytes: int) -> str:
    return (
        f"{uri} is {size} bytes, more than the limit of {max_bytes}; "
        "pass a larger max_bytes if the file is genuine"
    )


def _localize(source: str, cache: Path) -> Path:
    """A local path holding the source's bytes; s3:// objects are copied into the cache once."""
    path = _local_path(source)
    if path is not None:
        if not path.exists():
            raise InvalidInputError(f"no such file: {source}")
        return path
    s3, key, info = _s3_info(source)
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    # Keyed by name, size and mtime so that an overwritten object is fetched again.
    tag = hashlib.sha256(f"{key}\0{info.size}\0{mtime}".encode()).hexdigest()[:32]
    target = cache / "s3" / tag / PurePosixPath(key).name
    if target.is_file() and target.stat().st_size == info.size:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with s3.open_input_stream(key) as src, _atomic_write(target) as dst:
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)
    except OSError as e:
        raise InvalidInputError(f"cannot copy {source} to {target}: {e}") from e
    return target


@contextlib.contextmanager
def _atomic_write(path: Path) -> Iterator[BinaryIO]:
    """A temp file next to `path`, renamed over it only on success, so that a reader never
    sees a half-written file."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------- restricted pickle


class _Refused(Exception):
    """Raised inside the unpickler; reported as InvalidInputError with the file's name."""


def _refuse_objects(dtype: np.dtype) -> np.dtype:
    if dtype.hasobject:
        raise _Refused("refuses object arrays (they can hold arbitrary Python objects)")
    return dtype


class _NdarrayToken:
    """Stands for numpy.ndarray in a pickle. The real class would let a file call
    ndarray(shape, dtype) directly: any allocation size, object dtypes by name."""

    __slots__ = ()


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Exactly what numpy arrays need to unpickle (protocols 2-5, numpy 1.x and 2.x names),
    each wrapped to refuse object dtypes and anything but a plain ndarray. Built afresh for
    every file, so that one file cannot alter the wrappers another file sees."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    ndarray = _NdarrayToken()

    def reconstruct(subtype: Any, shape: Any, code: Any) -> np.ndarray:
        if subtype is not ndarray:
            raise _Refused(f"refuses to reconstruct {subtype!r}; only plain numpy arrays")
        # numpy always writes an empty (0,) placeholder; __setstate__ then sets the real
        # shape from data the file must hold, so the allocation is bounded by the file size.
        return multiarray._reconstruct(np.ndarray, (0,), b"b")

    def dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
        return _refuse_objects(np.dtype(spec, bool(align), bool(copy)))

    def scalar(dt: Any, *args: Any) -> Any:
        if not isinstance(dt, np.dtype):
            raise _Refused("refuses a numpy scalar without a dtype")
        return multiarray.scalar(_refuse_objects(dt), *args)

    def frombuffer(buf: Any, dt: Any, shape: Any, order: Any) -> np.ndarray:
        if not isinstance(dt, np.dtype):
            raise _Refused("refuses an array buffer without a dtype")
        return numeric._frombuffer(buf, _refuse_objects(dt), shape, order)

    def latin1(text: Any, encoding: Any = "latin1") -> bytes:
        # Protocol 2 writes bytes as _codecs.encode(text, 'latin1'); no other use is allowed.
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _Refused("refuses _codecs.encode other than of text to latin-1")
        return text.encode("latin-1")

    def empty_bytes(*args: Any) -> bytes:
        # Protocol 2 writes b'' as bytes().
        if args:
            raise _Refused("refuses bytes() with arguments")
        return b""

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): ndarray,
        ("numpy", "dtype"): dtype,
        ("_codecs", "encode"): latin1,
        ("__builtin__", "bytes"): empty_bytes,
        ("builtins", "bytes"): empty_bytes,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO) -> None:
        # encoding="bytes" keeps Python 2 str (the official CIFAR batches) as bytes, which is
        # how their keys and pixel data are meant to be read.
        super().__init__(file, encoding="bytes")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _Refused(
                f"refuses to load global {module}.{name}; only numpy arrays may be "
                "reconstructed from this file"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("refuses a persistent id; the file must be self-contained")


def _restricted_loads(data: bytes, what: str) -> Any:
    """Unpickle untrusted bytes: numpy arrays and plain containers only."""
    if not data:
        raise InvalidInputError(f"{what} is empty, not a valid pickle")
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise InvalidInputError(f"{what}: {e}") from None
    except RecursionError:
        raise InvalidInputError(f"{what} is not a valid pickle: nested too deeply") from None
    except Exception as e:
        raise InvalidInputError(f"{what} is not a valid pickle: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------- competition pickle


def _validate_competition(obj: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise InvalidInputError(
            f"{what}: expected a dict {{b'data': ..., b'ids': ...}}, got {type(obj).__name__}"
        )
    expected = {b"data", b"ids"}
    keys = set(obj)
    if keys != expected:
        parts = []
        missing = sorted(expected - keys)
        extra = sorted(repr(k) for k in keys - expected)
        if missing:
            parts.append("missing key(s) " + ", ".join(repr(k) for k in missing))
        if extra:
            parts.append("unexpected key(s) " + ", ".join(extra))
        hint = ""
        if {"data", "ids"} & keys:
            hint = " (the keys must be bytes, b'data' and b'ids', not str)"
        raise InvalidInputError(f"{what}: {'; '.join(parts)}{hint}")
    images = _validate_images(obj[b"data"], what)
    ids = _validate_ids(obj[b"ids"], len(images), what)
    return ids, images


def _validate_images(data: Any, what: str) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise InvalidInputError(
            f"{what}: b'data' is a {type(data).__name__}, expected a numpy uint8 array"
        )
    if data.dtype != np.uint8:
        raise InvalidInputError(f"{what}: b'data' has dtype {data.dtype}, expected uint8")
    shape = data.shape
    if shape == IMAGE_SHAPE:
        raise InvalidInputError(
            f"{what}: b'data' has shape {shape}, a single image; expected (N, 32, 32, 3)"
        )
    if data.ndim == 4 and shape[1:] == (3, 32, 32):
        raise InvalidInputError(
            f"{what}: b'data' has shape {shape}, which looks channels-first; expected "
            "(N, 32, 32, 3) channels-last: convert with data.transpose(0, 2, 3, 1)"
        )
    if data.ndim == 4 and shape[1:3] == (32, 32) and shape[3] != 3:
        raise InvalidInputError(
            f"{what}: b'data' has shape {shape}, {shape[3]} channels; expected 3 (RGB), "
            "shape (N, 32, 32, 3)"
        )
    if data.ndim == 2 and shape[1] == 32 * 32 * 3:
        raise InvalidInputError(
            f"{what}: b'data' has shape {shape}, flat rows; expected (N, 32, 32, 3): "
            "convert with data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)"
        )
    if data.ndim != 4 or shape[1:] != IMAGE_SHAPE:
        raise InvalidInputError(f"{what}: b'data' has shape {shape}, expected (N, 32, 32, 3)")
    if shape[0] == 0:
        raise InvalidInputError(f"{what}: b'data' holds no images (N=0)")
    return np.ascontiguousarray(data)


def _validate_ids(ids: Any, n: int, what: str) -> np.ndarray:
    if isinstance(ids, list | tuple):
        for value in ids:
            if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
                raise InvalidInputError(
                    f"{what}: b'ids' holds {value!r} ({type(value).__name__}), expected integers"
                )
        try:
            ids = np.array(ids, dtype=np.int64).reshape(-1)
        except OverflowError as e:
            raise InvalidInputError(f"{what}: b'ids' has a value outside int64: {e}") from None
    elif isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise InvalidInputError(
                f"{what}: b'ids' has dtype {ids.dtype}, expected an integer dtype"
            )
        if ids.ndim != 1:
            raise InvalidInputError(f"{what}: b'ids' has shape {ids.shape}, expected (N,)")
        if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
            raise InvalidInputError(f"{what}: b'ids' has a value outside int64")
        ids = ids.astype(np.int64, copy=False)
    else:
        raise InvalidInputError(
            f"{what}: b'ids' is a {type(ids).__name__}, expected a 1-D integer numpy array"
        )
    if len(ids) != n:
        raise InvalidInputError(f"{what}: b'ids' has {len(ids)} entries but b'data' has {n} images")
    uniq, counts = np.unique(ids, return_counts=True)
    dup = uniq[counts > 1]
    if len(dup):
        shown = ", ".join(str(i) for i in dup[:5].tolist())
        more = f" and {len(dup) - 5} more" if len(dup) > 5 else ""
        raise InvalidInputError(f"{what}: b'ids' repeats {len(dup)} id(s): {shown}{more}")
    return np.ascontiguousarray(ids)


def read_competition_pickle(
    path_or_uri: str | os.PathLike[str], *, max_bytes: int = 256 * 2**20
) -> tuple[np.ndarray, np.ndarray]:
    """Read the competition's `{b'data': uint8 (N,32,32,3), b'ids': int (N,)}` pickle with
    the restricted unpickler. Returns (ids int64 (N,), images uint8 (N, 32, 32, 3))."""
    what = str(path_or_uri)
    data = read_bytes(path_or_uri, max_bytes=max_bytes)
    return _validate_competition(_restricted_loads(data, what), what)


def write_competition_pickle(
    path: str | os.PathLike[str], ids: np.ndarray, images: np.ndarray, *, protocol: int = 4
) -> None:
    """Write `{b'data': images, b'ids': ids}` the competition's way: validated first, then
    atomically (temp file, then rename)."""
    if not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
        raise InvalidInputError(f"protocol must be 2..{pickle.HIGHEST_PROTOCOL}, got {protocol}")
    ids, images = _validate_competition({b"data": images, b"ids": ids}, f"writing {path}")
    target = Path(path)
    with _atomic_write(target) as f:
        pickle.dump({b"data": images, b"ids": ids}, f, protocol=protocol)


# -------------------------------------------------------------------- cifar-10-python


def _batch_labels(values: Any, n: int, what: str) -> np.ndarray:
    if isinstance(values, np.ndarray):
        labels = values
    elif isinstance(values, list | tuple) and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values
    ):
        labels = np.array(values, dtype=np.int64) if values else np.empty(0, np.int64)
    else:
        raise InvalidInputError(f"{what}: b'labels' must be a list of integers")
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise InvalidInputError(f"{what}: b'labels' must be a 1-D integer sequence")
    if len(labels) != n:
        raise InvalidInputError(f"{what}: {n} images but {len(labels)} labels")
    return labels.astype(np.int64)


def _parse_batch(raw: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    obj = _restricted_loads(raw, what)
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
    obj = _restricted_loads(raw, what)
    names = None
    if isinstance(obj, dict):
        names = obj.get(b"label_names", obj.get("label_names"))
    if not isinstance(names, list | tuple) or not all(isinstance(n, bytes | str) for n in names):
        raise InvalidInputError(f"{what}: expected a dict with b'label_names', a list of names")
    return _class_names([n.decode() if isinstance(n, bytes) else n for n in names], what)


def _class_names(names: Iterable[str], what: str) -> tuple[str, ...]:
    result = tuple(str(n).strip() for n in names)
    if len(result) != len(CLASSES):
        raise InvalidInputError(
            f"{what}: {len(result)} class names ({', '.join(result)}); CIFAR-10 has 10"
        )
    return result


def _read_batches(
    read: Callable[[str], bytes], what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    classes = _parse_meta(read(_META), f"{what}/{_META}")
    parts = [_parse_batch(read(name), f"{what}/{name}") for name in _TRAIN_BATCHES]
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = _parse_batch(read(_TEST_BATCH), f"{what}/{_TEST_BATCH}")
    if len(train_labels) == 0:
        raise InvalidInputError(f"{what}: the training batches hold no images")
    _check_label_range(train_labels, len(classes), f"{what} training batches")
    _check_label_range(test_labels, len(classes), f"{what}/{_TEST_BATCH}")
    return train_images, train_labels, test_images, test_labels, classes


def _batch_dir(path: Path) -> Path:
    nested = path / _BATCH_DIR
    return nested if nested.is_dir() else path


def _folder_files(path: Path, source: str) -> list[Path]:
    folder = _batch_dir(path)
    files = [folder / name for name in _BATCH_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InvalidInputError(
            f"{source}: missing batch file(s) {', '.join(missing)} in {folder}; expected the "
            f"cifar-10-python layout ({', '.join(_BATCH_FILES)})"
        )
    return files


def _read_tarball(path: Path, source: str) -> RawData:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            # One pass in archive order: seeking back in a gzip stream means decompressing
            # it again from the start.
            for member in tar:
                name = PurePosixPath(member.name).name
                if not member.isfile() or name not in _BATCH_FILES:
                    continue
                if name in found:
                    raise InvalidInputError(f"{source}: the archive holds several {name} files")
                f = tar.extractfile(member)
                if f is None:
                    raise InvalidInputError(f"{source}: cannot read {member.name}")
                found[name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InvalidInputError(f"{source} is not a readable .tar.gz: {e}") from e
    missing = [name for name in _BATCH_FILES if name not in found]
    if missing:
        raise InvalidInputError(
            f"{source}: the archive lacks batch file(s) {', '.join(missing)}; expected the "
            f"cifar-10-python layout ({_BATCH_DIR}/{{{', '.join(_BATCH_FILES)}}})"
        )
    return _raw(*_read_batches(found.__getitem__, source))


def _read_folder(path: Path, source: str) -> RawData:
    files = {f.name: f for f in _folder_files(path, source)}
    return _raw(*_read_batches(lambda name: files[name].read_bytes(), source))


def _raw(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray | None,
    test_labels: np.ndarray | None,
    classes: tuple[str, ...],
) -> RawData:
    digest = _source_digest(train_images, train_labels, test_images, test_labels)
    return RawData(train_images, train_labels, test_images, test_labels, classes, digest)


def _check_label_range(labels: np.ndarray, num_classes: int, what: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        row = int(bad[0])
        raise InvalidInputError(
            f"{what}: row {row}: label {int(labels[row])} is outside 0..{num_classes - 1} "
            f"({len(bad)} such row(s))"
        )


# --------------------------------------------------------------------------- Parquet


def _parquet_classes(metadata: dict[bytes, bytes] | None, what: str) -> tuple[str, ...]:
    if not metadata:
        return CLASSES
    if b"classes" in metadata:
        text = metadata[b"classes"].decode()
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            names = text.split(",")
        if isinstance(names, str):
            names = names.split(",")
        if not isinstance(names, list):
            raise InvalidInputError(f"{what}: metadata `classes` is neither a list nor names,comma")
        return _class_names(names, f"{what} metadata `classes`")
    if b"huggingface" in metadata:
        try:
            info = json.loads(metadata[b"huggingface"])
            names = info["info"]["features"]["label"]["names"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return CLASSES
        return _class_names(names, f"{what} metadata `huggingface`")
    return CLASSES


def _decode_chunk(start: int, blobs: list[bytes | None]) -> np.ndarray:
    """Decode encoded images to (len(blobs), 32, 32, 3) uint8; `start` numbers the rows in
    error messages. A module-level function so that pool workers can import it."""
    out = np.empty((len(blobs), *IMAGE_SHAPE), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        row = start + i
        if blob is None:
            raise InvalidInputError(f"row {row}: image bytes are missing (null)")
        try:
            # Only the two formats of the layout: fewer parsers see untrusted bytes, and the
            # format probe is shorter (~15% of the decode time of a 32x32 JPEG).
            with Image.open(io.BytesIO(blob), formats=_IMAGE_FORMATS) as im:
                # Checked before decoding, so an oversized image is never expanded in memory.
                if im.size != (32, 32):
                    w, h = im.size
                    raise InvalidInputError(f"row {row}: image is {w}x{h}, expected 32x32")
                rgb = im if im.mode == "RGB" else im.convert("RGB")
                out[i] = np.asarray(rgb)
        except InvalidInputError:
            raise
        except UnidentifiedImageError:
            raise InvalidInputError(
                f"row {row}: cannot decode image: not a PNG or JPEG image "
                f"({len(blob)} bytes starting {blob[:8]!r})"
            ) from None
        except Exception as e:
            raise InvalidInputError(f"row {row}: cannot decode image: {e}") from e
    return out


def _decode_workers(rows: int) -> int:
    if rows < _PARALLEL_DECODE_MIN_ROWS or multiprocessing.current_process().daemon:
        return 1  # daemonic processes (some task runners) may not start children
    # Spawned workers re-import the main module; one read from stdin cannot be re-imported.
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_DECODE_WORKERS, rows // (_PARALLEL_DECODE_MIN_ROWS // 2)))


def _decode_images(blobs: list[bytes | None]) -> np.ndarray:
    """(N, 32, 32, 3) uint8 from PNG/JPEG bytes, in worker processes when there are many."""
    workers = _decode_workers(len(blobs))
    if workers == 1:
        return _decode_chunk(0, blobs)
    out = np.empty((len(blobs), *IMAGE_SHAPE), dtype=np.uint8)
    bounds = np.linspace(0, len(blobs), workers * 4 + 1).astype(int).tolist()
    # spawn, not fork: forking a process that runs pyarrow or torch thread pools can deadlock.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            try:
                futures = [
                    (a, pool.submit(_decode_chunk, a, blobs[a:b]))
                    for a, b in itertools.pairwise(bounds)
                    if b > a
                ]
                for a, future in futures:
                    chunk = future.result()
                    out[a : a + len(chunk)] = chunk
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool as e:
        _log.warning("the image decode pool failed (%s); decoding in this process instead", e)
        return _decode_chunk(0, blobs)
    return out


def _read_parquet(path: Path, source: str) -> RawData:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise InvalidInputError(f"{source} is not a Parquet file: {e}") from e
    missing = [c for c in ("img", "label") if c not in schema.names]
    if missing:
        raise InvalidInputError(
            f"{source}: missing column(s) {', '.join(f'`{c}`' for c in missing)}; expected the "
            "Hugging Face layout: `img` struct<bytes, path> with PNG/JPEG bytes, `label` int64"
        )
    img_type = schema.field("img").type
    is_struct = pa.types.is_struct(img_type)
    if is_struct and img_type.get_field_index("bytes") < 0:
        raise InvalidInputError(f"{source}: column `img` has no `bytes` field: {img_type}")
    if not is_struct and not (pa.types.is_binary(img_type) or pa.types.is_large_binary(img_type)):
        raise InvalidInputError(
            f"{source}: column `img` has type {img_type}, expected struct<bytes>"
        )
    if not pa.types.is_integer(schema.field("label").type):
        raise InvalidInputError(
            f"{source}: column `label` has type {schema.field('label').type}, expected integers"
        )
    classes = _parquet_classes(pf.metadata.metadata, source)
    try:
        table = pf.read(columns=["img", "label"])
    except (pa.ArrowException, OSError) as e:
        raise InvalidInputError(f"{source}: cannot read the Parquet data: {e}") from e
    if table.num_rows == 0:
        raise InvalidInputError(f"{source} holds no rows")
    label_col = table.column("label")
    if label_col.null_count:
        row = int(np.flatnonzero(label_col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidInputError(f"{source}: row {row}: label is missing (null)")
    labels = label_col.to_numpy().astype(np.int64)
    _check_label_range(labels, len(classes), source)
    img = table.column("img")
    blobs = (pc.struct_field(img, "bytes") if is_struct else img).to_pylist()
    images = _decode_images(blobs)
    return _raw(images, labels, None, None, classes)


# ------------------------------------------------------------------- dispatch and cache


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    chosen = cache_dir or os.environ.get("CIFAR10_CACHE_DIR") or _DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def _source_kind(path: Path, source: str) -> str:
    if path.is_dir():
        return "folder"
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return "tarball"
    if name.endswith(".parquet"):
        return "parquet"
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InvalidInputError(f"cannot read {source}: {e}") from e
    if head == b"PAR1":
        return "parquet"
    if head[:2] == b"\x1f\x8b":
        return "tarball"
    raise InvalidInputError(f"cannot tell what kind of data {source} is; {_ACCEPTED_SOURCES}")


def _files_key(files: list[Path]) -> str:
    """sha256 of the files' bytes in order: the decode cache key."""
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1:
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as src:
            while chunk := src.read(_COPY_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _write_cache(path: Path, raw: RawData) -> None:
    arrays = {
        "format": np.array(_CACHE_FORMAT),
        "train_images": raw.train_images,
        "train_labels": raw.train_labels,
        "classes": np.array(raw.classes, dtype=str),
        "digest": np.array(raw.digest),
    }
    if raw.test_images is not None and raw.test_labels is not None:
        arrays["test_images"] = raw.test_images
        arrays["test_labels"] = raw.test_labels
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError as e:
        # The cache only saves time; a read-only or full disk must not fail the load.
        _log.warning("cannot write the decode cache %s: %s", path, e)


def _read_cache(path: Path) -> RawData | None:
    """The cached arrays, or None when absent or not exactly what `_write_cache` wrote."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != _CACHE_FORMAT:
                raise ValueError(f"cache format {int(z['format'])}")
            train_images, train_labels = z["train_images"], z["train_labels"]
            has_test = "test_images" in z.files
            test_images = z["test_images"] if has_test else None
            test_labels = z["test_labels"] if has_test else None
            classes = tuple(str(c) for c in z["classes"].tolist())
            digest = str(z["digest"])
        _check_arrays(train_images, train_labels, "train")
        if test_images is not None and test_labels is not None:
            _check_arrays(test_images, test_labels, "test")
        if len(classes) != len(CLASSES):
            raise ValueError(f"{len(classes)} classes")
        _check_label_range(train_labels, len(classes), "train")
        if test_labels is not None:
            _check_label_range(test_labels, len(classes), "test")
        # Re-digesting costs ~0.1 s for 50k images and catches silent corruption.
        if _source_digest(train_images, train_labels, test_images, test_labels) != digest:
            raise ValueError("content digest mismatch")
    except Exception as e:
        _log.warning("ignoring the unreadable decode cache %s (%s); rebuilding it", path, e)
        return None
    return RawData(train_images, train_labels, test_images, test_labels, classes, digest)


def _torchvision_folder(source: str, cache: Path) -> Path:
    root = Path(source.partition(":")[2] or cache / "torchvision").expanduser()
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as e:
        raise InvalidInputError(
            f"source {source!r} needs torchvision installed ({e}); or pass a local path or "
            "s3:// URI of the data instead"
        ) from e
    try:
        # Downloads the archive once, then only verifies checksums; the batches are then read
        # by this module like any other folder (restricted unpickling, cache, digest).
        CIFAR10(str(root), train=False, download=True)
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
        raise InvalidInputError(
            f"could not fetch CIFAR-10 through torchvision into {root}: {e}. The machine looks "
            "offline (or the download site is unreachable): pass a local path or an s3:// URI "
            "of the cifar-10-python folder, its .tar.gz or a Parquet file as the source instead"
        ) from e
    return root / _BATCH_DIR


def _decode_source(path: Path, kind: str, source: str) -> RawData:
    if kind == "folder":
        return _read_folder(path, source)
    if kind == "tarball":
        return _read_tarball(path, source)
    return _read_parquet(path, source)


def load_arrays(
    source: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> RawData:
    """Read a source into arrays, through the local decode cache.

    The cache key is the sha256 of the source's bytes (for a folder, of its batch files in
    order), so a changed file is decoded again and a renamed or re-downloaded one is not.
    `cache_dir` defaults to $CIFAR10_CACHE_DIR, else ~/.cache/cifar-pipeline; S3 objects
    and torchvision's download are kept there too.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise InvalidInputError(f"source must be a non-empty string; {_ACCEPTED_SOURCES}")
    cache = _cache_root(cache_dir)
    if source == "torchvision" or source.startswith("torchvision:"):
        path, kind = _torchvision_folder(source, cache), "folder"
    else:
        path = _localize(source, cache)
        kind = _source_kind(path, source)
    files = _folder_files(path, source) if kind == "folder" else [path]
    cache_file = cache / f"{_files_key(files)}.npz"
    cached = _read_cache(cache_file)
    if cached is not None:
        return cached
    raw = _decode_source(path, kind, source)
    _write_cache(cache_file, raw)
    return raw
