"""The restricted unpickler: numpy arrays and plain containers, and nothing else, out of
untrusted pickles (the CIFAR batches, the competition file), the work bounded before it is done.

It is built on the pure-Python unpickler (`pickle._Unpickler`) because the C one offers no
hook between opcodes: a file well under the size cap could make it build containers
hundreds of times its size, or size its memo table by an index the file names (a 10-byte
file with LONG_BINPUT 2**31 makes it allocate 32 GiB), before any check could run. The
Python one dispatches every opcode through a table, and this module swaps in its own:
- every opcode counts against a budget that grows with the file's size, which bounds the
  objects, container elements, memo entries and marks a file can create (one each at most);
- every copy of array or byte data (numpy's BUILD, protocol 2's bytes, numpy scalars) is
  charged against a second budget, twice the file's size, before it is made: a genuine file
  copies each array once or twice, a hostile one reuses one buffer many times;
- containers grow only by the opcodes meant for them (APPENDS on lists, SETITEMS on dicts),
  and keys are str, bytes or int64, whose hashes cannot be chosen to collide;
- the memo is a dict with keys a pickler could have written.
Its speed (about a microsecond an opcode) does not matter: a genuine file holds at most a
few tens of thousands of opcodes, its bulk a few large byte strings read whole.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from model.data.arrays import InvalidInputError, clip

# Each opcode creates at most one object of a few hundred bytes (an empty set, 216 B, is the
# largest) besides the data it carries from the file. An official CIFAR batch needs ~30,000
# opcodes (a label and a file name per image; ~90,000 once Python 3 rewrites it with
# protocol 2, within the 700,000 its 46 MB allow), the competition file a few dozen. An
# opcode flood stops at ~3.5x the file's size (216 B per 64 B) plus ~14 MiB.
OPCODES_FIXED = 2**16
BYTES_PER_OPCODE = 64
# Array and byte data copied while rebuilding (numpy's BUILD, protocol 2's bytes, numpy
# scalars) is data the file holds, copied at most twice by a genuine file: protocol 2 turns
# text into bytes, then BUILD copies the bytes into the array. The slack covers small files.
COPIES_PER_FILE_BYTE = 2
COPY_SLACK_BYTES = 2**20
# The largest memo index a pickler writes (LONG_BINPUT is 32-bit).
MAX_MEMO_KEY = 2**32 - 1


class Refused(Exception):
    """Raised inside the unpickler; reported as InvalidInputError with the file's name."""


def _refuse_objects(dtype: np.dtype) -> np.dtype:
    if dtype.hasobject:
        raise Refused("refuses object arrays (they can hold arbitrary Python objects)")
    return dtype


def _key(key: Any) -> Any:
    # Ints past int64 and tuples can be chosen to share one hash, which makes every insertion
    # scan all the others; str and bytes are hashed with a per-process random key.
    if type(key) in (str, bytes) or (type(key) is int and -(2**63) <= key < 2**63):
        return key
    kind = "an integer outside int64" if type(key) is int else f"of type {type(key).__name__}"
    raise Refused(f"refuses a dict key or set element {kind}")


def _target(obj: Any, kind: type, verb: str) -> Any:
    if type(obj) is not kind:
        raise Refused(f"refuses to {verb} a {type(obj).__name__}")
    return obj


class _NdarrayToken:
    """Stands for numpy.ndarray in a pickle. The real class would let a file call
    ndarray(shape, dtype) directly: any allocation size, object dtypes by name."""

    __slots__ = ()


def _allowed_globals(charge: Callable[[int], None]) -> dict[tuple[str, str], Any]:
    """Exactly what numpy arrays need to unpickle (protocols 2-5, numpy 1.x and 2.x names),
    each wrapped to refuse object dtypes and anything but a plain ndarray, and to charge the
    data it copies. Built afresh for every file, so that one file cannot alter the wrappers
    another file sees."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    ndarray = _NdarrayToken()

    def reconstruct(subtype: Any, shape: Any, code: Any) -> np.ndarray:
        if subtype is not ndarray:
            raise Refused(f"refuses to reconstruct {clip(repr(subtype))}; only plain numpy arrays")
        # numpy always writes an empty (0,) placeholder; BUILD then sets the real shape from
        # data the file must hold, so the allocation is bounded by the file size.
        return multiarray._reconstruct(np.ndarray, (0,), b"b")

    def dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
        return _refuse_objects(np.dtype(spec, bool(align), bool(copy)))

    def scalar(dt: Any, *args: Any) -> Any:
        if not isinstance(dt, np.dtype):
            raise Refused("refuses a numpy scalar without a dtype")
        charge(_refuse_objects(dt).itemsize)
        return multiarray.scalar(dt, *args)

    def frombuffer(buf: Any, dt: Any, shape: Any, order: Any) -> np.ndarray:
        if not isinstance(dt, np.dtype):
            raise Refused("refuses an array buffer without a dtype")
        try:
            nbytes = memoryview(buf).nbytes
        except TypeError:
            raise Refused("refuses an array buffer that is not bytes") from None
        # numpy makes a view, not a copy; charged all the same in case a version copies.
        charge(nbytes)
        return numeric._frombuffer(buf, _refuse_objects(dt), shape, order)

    def latin1(text: Any, encoding: Any = "latin1") -> bytes:
        # Protocol 2 writes bytes as _codecs.encode(text, 'latin1'); no other use is allowed.
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise Refused("refuses _codecs.encode other than of text to latin-1")
        charge(len(text))
        return text.encode("latin-1")

    def empty_bytes(*args: Any) -> bytes:
        # Protocol 2 writes b'' as bytes().
        if args:
            raise Refused("refuses bytes() with arguments")
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


def _array_state_bytes(state: Any) -> int:
    """The bytes numpy may copy to apply `state`, numpy's (version, shape, dtype, is_fortran,
    data) or the same without version; refused unless it is that with plain data."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise Refused("refuses an array state numpy does not write")
    dt, data = state[-3], state[-1]
    if not isinstance(dt, np.dtype):
        raise Refused("refuses an array state without a dtype")
    _refuse_objects(dt)
    if not isinstance(data, bytes | bytearray | str):
        raise Refused(f"refuses array data of type {type(data).__name__}")
    return len(data)


class _Memo(dict):
    def __setitem__(self, key: Any, value: Any) -> None:
        if type(key) is not int or not 0 <= key <= MAX_MEMO_KEY:
            raise Refused(f"refuses a memo index outside 0..{MAX_MEMO_KEY}")
        super().__setitem__(key, value)


class _Dispatch(dict):
    def __missing__(self, code: int) -> Any:
        raise pickle.UnpicklingError(f"invalid load key {bytes([code])!r}")


def _load_build(self: _RestrictedUnpickler) -> None:
    state = self.stack.pop()
    inst = self.stack[-1]
    if type(inst) is np.ndarray:
        self.charge(_array_state_bytes(state))
        inst.__setstate__(state)
    elif isinstance(inst, np.dtype):
        inst.__setstate__(state)
        _refuse_objects(inst)
    else:
        raise Refused(f"refuses to set the state of a {type(inst).__name__}")


def _load_append(self: _RestrictedUnpickler) -> None:
    value = self.stack.pop()
    _target(self.stack[-1], list, "append to").append(value)


def _load_appends(self: _RestrictedUnpickler) -> None:
    items = self.pop_mark()
    _target(self.stack[-1], list, "append to").extend(items)


def _load_setitem(self: _RestrictedUnpickler) -> None:
    value = self.stack.pop()
    key = self.stack.pop()
    _target(self.stack[-1], dict, "set an item of")[_key(key)] = value


def _load_setitems(self: _RestrictedUnpickler) -> None:
    items = self.pop_mark()
    target = _target(self.stack[-1], dict, "set an item of")
    for i in range(0, len(items), 2):
        target[_key(items[i])] = items[i + 1]


def _load_dict(self: _RestrictedUnpickler) -> None:
    items = self.pop_mark()
    self.append({_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})


def _load_additems(self: _RestrictedUnpickler) -> None:
    items = self.pop_mark()
    _target(self.stack[-1], set, "add to").update(_key(item) for item in items)


def _load_frozenset(self: _RestrictedUnpickler) -> None:
    self.append(frozenset(_key(item) for item in self.pop_mark()))


def _counted(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    def step(self: _RestrictedUnpickler) -> None:
        self.opcodes_left -= 1
        if self.opcodes_left < 0:
            raise Refused(f"holds more than {self.max_opcodes} pickle opcodes, the limit for a "
                          f"{self.size}-byte file; a genuine file needs far fewer")
        handler(self)

    return step


def _dispatch_table() -> _Dispatch:
    overrides = {
        pickle.BUILD: _load_build,
        pickle.APPEND: _load_append,
        pickle.APPENDS: _load_appends,
        pickle.SETITEM: _load_setitem,
        pickle.SETITEMS: _load_setitems,
        pickle.DICT: _load_dict,
        pickle.ADDITEMS: _load_additems,
        pickle.FROZENSET: _load_frozenset,
    }
    table = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    table.update({op[0]: handler for op, handler in overrides.items()})
    return _Dispatch({code: _counted(handler) for code, handler in table.items()})


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    dispatch = _dispatch_table()

    def __init__(self, data: bytes) -> None:
        # encoding="bytes" keeps Python 2 str (the official CIFAR batches) as bytes, which is
        # how their keys and pixel data are meant to be read.
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.memo = _Memo()
        self.size = len(data)
        self.max_opcodes = OPCODES_FIXED + len(data) // BYTES_PER_OPCODE
        self.opcodes_left = self.max_opcodes
        self.max_copy = COPIES_PER_FILE_BYTE * len(data) + COPY_SLACK_BYTES
        self.copy_left = self.max_copy
        self._allowed = _allowed_globals(self.charge)

    def charge(self, nbytes: int) -> None:
        """Account for `nbytes` about to be copied; refuse before the copy if over budget."""
        self.copy_left -= nbytes
        if self.copy_left < 0:
            raise Refused(f"copies more than {self.max_copy} bytes of array data, the limit for a "
                          f"{self.size}-byte file; a genuine file copies each array at most twice")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise Refused(f"refuses to load global {clip(f'{module}.{name}')}; only numpy arrays "
                          "may be reconstructed from this file") from None

    def persistent_load(self, pid: Any) -> Any:
        raise Refused("refuses a persistent id; the file must be self-contained")


def restricted_loads(data: bytes, what: str) -> Any:
    """Unpickle untrusted bytes: numpy arrays and plain containers only, within budgets."""
    if not data:
        raise InvalidInputError(f"{what} is empty, not a valid pickle")
    try:
        return _RestrictedUnpickler(data).load()
    except Refused as e:
        raise InvalidInputError(f"{what}: {e}") from None
    except RecursionError:
        raise InvalidInputError(f"{what} is not a valid pickle: nested too deeply") from None
    except Exception as e:
        raise InvalidInputError(
            f"{what} is not a valid pickle: {type(e).__name__}: {clip(str(e))}"
        ) from e
