"""The competition file: scoring input, not training data.

A pickled dict `{b'data': uint8 (N, 32, 32, 3), b'ids': int (N,)}`, read only with the
restricted unpickler and then validated, with a message for each way it can be wrong.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from model.data.arrays import IMAGE_SHAPE, InvalidInputError, quote
from model.data.unpickle import restricted_loads
from model.data.uri import read_bytes
from model.fileio import atomic_write

# 256 MiB holds ~87,000 images; the competition's file has 10,000 (30 MiB).
MAX_COMPETITION_BYTES = 256 * 2**20
# Error messages name at most this many unexpected keys.
_SHOWN_KEYS = 5


def _validate_competition(obj: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{what}: expected a dict {{b'data': ..., b'ids': ...}}, got "
                                f"{type(obj).__name__}")
    expected = {b"data", b"ids"}
    keys = set(obj)
    if keys != expected:
        parts = []
        missing = sorted(expected - keys)
        extra = sorted(quote(k) for k in keys - expected)
        if missing:
            parts.append("missing key(s) " + ", ".join(repr(k) for k in missing))
        if extra:
            more = f" and {len(extra) - _SHOWN_KEYS} more" if len(extra) > _SHOWN_KEYS else ""
            parts.append("unexpected key(s) " + ", ".join(extra[:_SHOWN_KEYS]) + more)
        hint = ""
        if {"data", "ids"} & keys:
            hint = " (the keys must be bytes, b'data' and b'ids', not str)"
        raise InvalidInputError(f"{what}: {'; '.join(parts)}{hint}")
    images = _validate_images(obj[b"data"], what)
    ids = _validate_ids(obj[b"ids"], len(images), what)
    return ids, images


def _validate_images(data: Any, what: str) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise InvalidInputError(f"{what}: b'data' is a {type(data).__name__}, expected a "
                                "numpy uint8 array")
    if data.dtype != np.uint8:
        raise InvalidInputError(f"{what}: b'data' has dtype {data.dtype}, expected uint8")
    shape = data.shape
    if shape == IMAGE_SHAPE:
        raise InvalidInputError(f"{what}: b'data' has shape {shape}, a single image; expected "
                                "(N, 32, 32, 3)")
    if data.ndim == 4 and shape[1:] == (3, 32, 32):
        raise InvalidInputError(f"{what}: b'data' has shape {shape}, which looks channels-first; "
                                "expected (N, 32, 32, 3) channels-last: convert with "
                                "data.transpose(0, 2, 3, 1)")
    if data.ndim == 4 and shape[1:3] == (32, 32) and shape[3] != 3:
        raise InvalidInputError(f"{what}: b'data' has shape {shape}, {shape[3]} channels; expected "
                                "3 (RGB), shape (N, 32, 32, 3)")
    if data.ndim == 2 and shape[1] == 32 * 32 * 3:
        raise InvalidInputError(f"{what}: b'data' has shape {shape}, flat rows; expected "
                                "(N, 32, 32, 3): convert with "
                                "data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)")
    if data.ndim != 4 or shape[1:] != IMAGE_SHAPE:
        raise InvalidInputError(f"{what}: b'data' has shape {shape}, expected (N, 32, 32, 3)")
    if shape[0] == 0:
        raise InvalidInputError(f"{what}: b'data' holds no images (N=0)")
    return np.ascontiguousarray(data)


def _validate_ids(ids: Any, n: int, what: str) -> np.ndarray:
    if isinstance(ids, list | tuple):
        for value in ids:
            if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
                raise InvalidInputError(f"{what}: b'ids' holds {quote(value)} "
                                        f"({type(value).__name__}), expected integers")
        try:
            ids = np.array(ids, dtype=np.int64).reshape(-1)
        except OverflowError as e:
            raise InvalidInputError(f"{what}: b'ids' has a value outside int64: {e}") from None
    elif isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise InvalidInputError(f"{what}: b'ids' has dtype {ids.dtype}, expected an integer "
                                    "dtype")
        if ids.ndim != 1:
            raise InvalidInputError(f"{what}: b'ids' has shape {ids.shape}, expected (N,)")
        if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
            raise InvalidInputError(f"{what}: b'ids' has a value outside int64")
        ids = ids.astype(np.int64, copy=False)
    else:
        raise InvalidInputError(f"{what}: b'ids' is a {type(ids).__name__}, expected a 1-D integer "
                                "numpy array")
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
    path_or_uri: str | os.PathLike[str], *, max_bytes: int = MAX_COMPETITION_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Read the competition's `{b'data': uint8 (N,32,32,3), b'ids': int (N,)}` pickle with
    the restricted unpickler. Returns (ids int64 (N,), images uint8 (N, 32, 32, 3))."""
    what = str(path_or_uri)
    data = read_bytes(path_or_uri, max_bytes=max_bytes)
    return _validate_competition(restricted_loads(data, what), what)


def write_competition_pickle(
    path: str | os.PathLike[str], ids: np.ndarray, images: np.ndarray, *, protocol: int = 4
) -> None:
    """Write `{b'data': images, b'ids': ids}` the competition's way: validated first, then
    atomically (temp file, then rename)."""
    if not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
        raise InvalidInputError(f"protocol must be 2..{pickle.HIGHEST_PROTOCOL}, got {protocol}")
    ids, images = _validate_competition({b"data": images, b"ids": ids}, f"writing {path}")
    with atomic_write(path) as f:
        pickle.dump({b"data": images, b"ids": ids}, f, protocol=protocol)
