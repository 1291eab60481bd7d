"""Any supported source read into arrays, through a local decode cache.

Sources: the official cifar-10-python batches (a folder or its .tar.gz), Parquet in the
Hugging Face layout, and torchvision's download, each from a local path, `file://` or
`s3://`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path
from typing import Protocol

import numpy as np

from model.data.arrays import (
    CLASSES,
    InvalidInputError,
    RawData,
    check_arrays,
    check_label_range,
    source_digest,
)
from model.data.cifar import BATCH_DIR, folder_files, read_folder, read_tarball
from model.data.parquet import read_parquet
from model.data.uri import localize
from model.fileio import atomic_write

# Bumped whenever the cache layout or the decoding changes, so old entries are rebuilt.
_CACHE_FORMAT = 1
_DEFAULT_CACHE_DIR = "~/.cache/cifar-pipeline"
_HASH_CHUNK = 8 * 2**20

_ACCEPTED_SOURCES = ("accepted sources: a cifar-10-python folder "
                     "(data_batch_1..5, test_batch, batches.meta), its .tar.gz, a Parquet file "
                     "with columns `img` (PNG/JPEG bytes) and `label`, or 'torchvision[:root]'; "
                     "files as a local path, file:// or s3:// URI")

_log = logging.getLogger(__name__)


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
            while chunk := src.read(_HASH_CHUNK):
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
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError as e:
        # The cache only saves time; a read-only or full disk must not fail the load.
        _log.warning("cannot write the decode cache %s: %s", path, e)


def _check_uncompressed(path: Path) -> None:
    """`_write_cache` stores its arrays uncompressed, so their sizes add up to the file's.
    A file that says otherwise (a compressed member: a zip bomb from a shared cache) is
    refused before any member is read."""
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    if any(m.compress_type != zipfile.ZIP_STORED for m in members):
        raise ValueError("a compressed member; the cache stores its arrays uncompressed")
    if sum(m.file_size for m in members) > path.stat().st_size:
        raise ValueError("members larger than the file")


def _read_cache(path: Path) -> RawData | None:
    """The cached arrays, or None when absent or not exactly what `_write_cache` wrote."""
    if not path.is_file():
        return None
    try:
        _check_uncompressed(path)
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != _CACHE_FORMAT:
                raise ValueError(f"cache format {int(z['format'])}")
            train_images, train_labels = z["train_images"], z["train_labels"]
            test_images, test_labels = ((z["test_images"], z["test_labels"])
                                        if "test_images" in z.files else (None, None))
            classes = tuple(str(c) for c in z["classes"].tolist())
            digest = str(z["digest"])
        check_arrays(train_images, train_labels, "train")
        if test_images is not None and test_labels is not None:
            check_arrays(test_images, test_labels, "test")
        if len(classes) != len(CLASSES):
            raise ValueError(f"{len(classes)} classes")
        check_label_range(train_labels, len(classes), "train")
        if test_labels is not None:
            check_label_range(test_labels, len(classes), "test")
        # Re-digesting costs ~0.1 s for 50k images and catches silent corruption.
        if source_digest(train_images, train_labels, test_images, test_labels) != digest:
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
        raise InvalidInputError(f"source {source!r} needs torchvision installed ({e}); or pass a "
                                "local path or s3:// URI of the data instead") from e
    try:
        # Downloads the archive once, then only verifies checksums; the batches are then read
        # by this package like any other folder (restricted unpickling, cache, digest).
        CIFAR10(str(root), train=False, download=True)
    except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
        raise InvalidInputError(f"could not fetch CIFAR-10 through torchvision into {root}: {e}. "
                                "The machine looks offline (or the download site is unreachable): "
                                "pass a local path or an s3:// URI of the cifar-10-python folder, "
                                "its .tar.gz or a Parquet file as the source instead") from e
    return root / BATCH_DIR


def _decode_source(path: Path, kind: str, source: str) -> RawData:
    readers = {"folder": read_folder, "tarball": read_tarball, "parquet": read_parquet}
    return readers[kind](path, source)


class SharedCache(Protocol):
    """A decode cache shared by machines (object storage): entries are the local cache's
    files, named by the source's content digest. Whoever can write to it can replace an
    entry together with its digest, so an entry is used only when `digest`, what the source
    is known to decode to (a job's, from the parent that decoded it), is given."""

    digest: str | None

    def fetch(self, name: str, path: Path) -> bool:
        """Copy entry `name` to `path`; False when there is none."""

    def publish(self, name: str, path: Path) -> None:
        """Store the file at `path` as entry `name`."""


def load_arrays(
    source: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None,
    shared: SharedCache | None = None,
) -> RawData:
    """Read a source into arrays through the local decode cache, keyed by the sha256 of the
    source's bytes (a folder's batch files in order): a changed file is decoded again, a
    renamed or re-downloaded one is not. `cache_dir` (default $CIFAR10_CACHE_DIR, else
    ~/.cache/cifar-pipeline) also keeps S3 objects and torchvision's download. A `shared`
    cache is tried on a local miss and given what this machine decodes, so a cluster decodes
    each source once; every entry is re-digested, and with `shared.digest` one that holds
    other data is refused."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise InvalidInputError(f"source must be a non-empty string; {_ACCEPTED_SOURCES}")
    cache = _cache_root(cache_dir)
    if source == "torchvision" or source.startswith("torchvision:"):
        path, kind = _torchvision_folder(source, cache), "folder"
    else:
        path = localize(source, cache)
        kind = _source_kind(path, source)
    files = folder_files(path, source) if kind == "folder" else [path]
    cache_file = cache / f"{_files_key(files)}.npz"
    expected = shared.digest if shared is not None else None
    cached = _read_cache(cache_file)
    if cached is None and expected and shared.fetch(cache_file.name, cache_file):
        cached = _read_cache(cache_file)
    if cached is not None and expected and cached.digest != expected:
        _log.warning("refusing the decode cache entry %s: it holds data of digest %s, not the "
                     "%s that %s decodes to; decoding the source afresh", cache_file.name,
                     cached.digest, expected, source)
        cached = None
    if cached is not None:
        return cached
    raw = _decode_source(path, kind, source)
    _write_cache(cache_file, raw)
    if shared is not None and cache_file.is_file():
        shared.publish(cache_file.name, cache_file)
    return raw
