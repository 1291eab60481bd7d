"""The competition pickle: read only through the restricted unpickler, then validated.

Every malicious file below would run `touch SENTINEL` under a plain `pickle.load`; each
test asserts both the refusal and that the sentinel file was never created.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import pickle
import pickletools
import subprocess
from pathlib import Path

import numpy as np
import pytest

from model.data import InvalidInputError, read_competition_pickle, uri, write_competition_pickle
from tests.conftest import COMPETITION_SAMPLE as SAMPLE


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _write(path: Path, obj: object, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _valid(n: int = 4) -> dict:
    return {b"data": _images(n), b"ids": np.arange(100, 100 + n, dtype=np.int64)}


# ---------------------------------------------------------------------------- valid


@pytest.mark.skipif(not SAMPLE.exists(), reason="shared sample not present")
def test_reads_the_shared_sample() -> None:
    ids, images = read_competition_pickle(SAMPLE)
    assert ids.dtype == np.int64 and ids.shape == (1000,)
    assert images.dtype == np.uint8 and images.shape == (1000, 32, 32, 3)
    assert images.flags.c_contiguous
    assert len(np.unique(ids)) == 1000
    # The same through a str path and a file:// URI.
    assert np.array_equal(read_competition_pickle(str(SAMPLE))[0], ids)
    assert np.array_equal(read_competition_pickle(SAMPLE.as_uri())[1], images)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_accepts_protocols(tmp_path: Path, protocol: int) -> None:
    obj = _valid()
    ids, images = read_competition_pickle(_write(tmp_path / "t.pkl", obj, protocol))
    np.testing.assert_array_equal(ids, obj[b"ids"])
    np.testing.assert_array_equal(images, obj[b"data"])


@pytest.mark.parametrize(
    "ids",
    [
        [7, 3, 5, 1],
        (7, 3, 5, 1),
        [np.int32(7), np.int64(3), 5, 1],
        np.array([7, 3, 5, 1], dtype=np.int32),
        np.array([7, 3, 5, 1], dtype=np.uint16),
    ],
)
def test_integer_ids_of_any_width_become_int64(tmp_path: Path, ids: object) -> None:
    path = _write(tmp_path / "t.pkl", {b"data": _images(4), b"ids": ids})
    got, _ = read_competition_pickle(path)
    assert got.dtype == np.int64 and got.tolist() == [7, 3, 5, 1]


def test_fortran_order_images_come_back_c_contiguous(tmp_path: Path) -> None:
    images = np.asfortranarray(_images(3))
    path = _write(tmp_path / "t.pkl", {b"data": images, b"ids": np.arange(3)})
    _, got = read_competition_pickle(path)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, images)


def test_write_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.pkl"
    images, ids = _images(6), np.array([5, 4, 3, 2, 1, 0])
    write_competition_pickle(path, ids, images)
    got_ids, got_images = read_competition_pickle(path)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_images, images)
    # The competition's own way: a plain pickle of a dict with bytes keys.
    raw = pickle.loads(path.read_bytes())
    assert set(raw) == {b"data", b"ids"} and raw[b"ids"].dtype == np.int64
    assert [p.name for p in tmp_path.iterdir()] == ["out.pkl"]  # no temp file left behind

    write_competition_pickle(path, [9, 8], _images(2, 1), protocol=5)
    assert read_competition_pickle(path)[0].tolist() == [9, 8]


def test_write_validates_before_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "out.pkl"
    with pytest.raises(InvalidInputError, match="repeats 1 id"):
        write_competition_pickle(path, [1, 1], _images(2))
    with pytest.raises(InvalidInputError, match="dtype float32"):
        write_competition_pickle(path, [1, 2], _images(2).astype(np.float32))
    with pytest.raises(InvalidInputError, match="protocol"):
        write_competition_pickle(path, [1, 2], _images(2), protocol=1)
    assert list(tmp_path.iterdir()) == []

    write_competition_pickle(path, [1, 2], _images(2))
    before = path.read_bytes()
    with pytest.raises(InvalidInputError):
        write_competition_pickle(path, [1], _images(2))
    assert path.read_bytes() == before  # a failed write leaves the old file intact


def test_written_file_uses_only_numpy_globals(tmp_path: Path) -> None:
    path = tmp_path / "out.pkl"
    write_competition_pickle(path, np.arange(2), _images(2))
    opcodes = {op.name for op, _, _ in pickletools.genops(path.read_bytes())}
    assert "STACK_GLOBAL" in opcodes and not opcodes & {"INST", "OBJ", "EXT1", "BINPERSID"}


# ------------------------------------------------------------------------ malicious


def _touch(sentinel: Path) -> str:
    return f"touch {sentinel}"


class _System:
    def __init__(self, sentinel: Path) -> None:
        self.cmd = _touch(sentinel)

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Popen:
    def __init__(self, sentinel: Path) -> None:
        self.args = ["touch", str(sentinel)]

    def __reduce__(self):
        return (subprocess.Popen, (self.args,))


class _Eval:
    def __init__(self, sentinel: Path) -> None:
        self.code = f"__import__('os').system({_touch(sentinel)!r})"

    def __reduce__(self):
        return (builtins.eval, (self.code,))


class _Exec:
    def __init__(self, sentinel: Path) -> None:
        self.code = f"import os; os.system({_touch(sentinel)!r})"

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def _getattr_chain(sentinel: Path) -> bytes:
    # getattr(__import__('os'), 'system')('touch ...'), the classic hand-written exploit.
    return (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'"
        + _touch(sentinel).encode()
        + b"'\ntR."
    )


def _inst_opcode(sentinel: Path) -> bytes:
    return b"(S'" + _touch(sentinel).encode() + b"'\nios\nsystem\n."


def _numpy_runstring(sentinel: Path) -> bytes:
    # Only numpy array reconstruction is allowed, not "anything under numpy".
    code = f"import os; os.system({_touch(sentinel)!r})".encode()
    return b"cnumpy.testing._private.utils\nrunstring\n(V" + code + b"\n(dtR."


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_refuses_os_system(tmp_path: Path, protocol: int) -> None:
    sentinel = tmp_path / "SENTINEL"
    path = _write(tmp_path / "evil.pkl", _System(sentinel), protocol)
    with pytest.raises(InvalidInputError, match=r"refuses to load global (posix|os)\.system"):
        read_competition_pickle(path)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("payload", "global_name"),
    [
        (_Popen, "subprocess.Popen"),
        (_Eval, "builtins.eval"),
        (_Exec, "builtins.exec"),
    ],
)
def test_refuses_code_running_globals(tmp_path: Path, payload: type, global_name: str) -> None:
    sentinel = tmp_path / "SENTINEL"
    path = _write(tmp_path / "evil.pkl", payload(sentinel))
    with pytest.raises(InvalidInputError, match=f"refuses to load global {global_name}"):
        read_competition_pickle(path)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("craft", "refused"),
    [
        (_getattr_chain, "builtins.getattr"),
        (_inst_opcode, "os.system"),
        (_numpy_runstring, "numpy.testing._private.utils.runstring"),
    ],
)
def test_refuses_hand_written_exploits(tmp_path: Path, craft, refused: str) -> None:
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pkl"
    path.write_bytes(craft(sentinel))
    with pytest.raises(InvalidInputError, match=f"refuses to load global {refused}"):
        read_competition_pickle(path)
    assert not sentinel.exists()


def test_refuses_a_payload_inside_a_valid_looking_dict(tmp_path: Path) -> None:
    sentinel = tmp_path / "SENTINEL"
    for key in (b"data", b"ids"):
        obj = _valid() | {key: _System(sentinel)}
        with pytest.raises(InvalidInputError, match="refuses to load global"):
            read_competition_pickle(_write(tmp_path / "evil.pkl", obj))
    assert not sentinel.exists()


def test_refuses_object_arrays_with_payloads(tmp_path: Path) -> None:
    sentinel = tmp_path / "SENTINEL"
    ids = np.array([_System(sentinel), 2, 3, 4], dtype=object)
    structured = np.zeros(4, dtype=[("id", "i8"), ("obj", "O")])
    structured["obj"][0] = _Exec(sentinel)
    for bad_ids in (ids, structured):
        path = _write(tmp_path / "evil.pkl", {b"data": _images(4), b"ids": bad_ids})
        with pytest.raises(InvalidInputError, match="refuses"):
            read_competition_pickle(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_refuses_plain_object_arrays(tmp_path: Path, protocol: int) -> None:
    obj = {b"data": _images(4), b"ids": np.array([1, 2, 3, 4], dtype=object)}
    with pytest.raises(InvalidInputError, match="refuses object arrays"):
        read_competition_pickle(_write(tmp_path / "o.pkl", obj, protocol))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # _reconstruct may only build plain ndarrays.
        (
            b"cnumpy._core.multiarray\n_reconstruct\n(cbuiltins\nobject\n(I0\ntS'b'\ntR.",
            "refuses to load global builtins.object",
        ),
        (
            b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\ndtype\n(I0\ntS'b'\ntR.",
            "refuses to reconstruct",
        ),
        # _codecs.encode is there for protocol 2's bytes, not for arbitrary codecs.
        (b"c_codecs\nencode\n(Vabc\nVrot13\ntR.", "refuses _codecs.encode"),
        (b"c__builtin__\nbytes\n(I5\ntR.", "refuses bytes"),
        (b"Pid\n.", "refuses a persistent id"),
        (b"\x80\x02(X\x02\x00\x00\x00idQ.", "refuses a persistent id"),
        (b"\x80\x02\x82\x01.", "not a valid pickle"),  # copyreg extension codes
        # numpy.ndarray is only a token for _reconstruct: calling it would allocate at will.
        (b"cnumpy\nndarray\n((I4294967296\ntVO\ntR.", "not a valid pickle"),
        (b"cnumpy\nndarray\n)\x81.", "not a valid pickle"),
    ],
)
def test_refuses_abuse_of_the_allowed_globals(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(raw)
    with pytest.raises(InvalidInputError, match=message):
        read_competition_pickle(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # Containers grow only through the opcodes meant for them.
        (b"\x80\x02]K\x00K\x01s.", "refuses to set an item of a list"),
        (b"\x80\x02}K\x01a.", "refuses to append to a dict"),
        (b"\x80\x02}(K\x01e.", "refuses to append to a dict"),
        (b"\x80\x04}(K\x01\x90.", "refuses to add to a dict"),
        (b"\x80\x02]}b.", "refuses to set the state of a list"),
        # Keys whose hashes a file could make collide.
        (b"\x80\x02}\x8a\x09" + b"\x01" * 8 + b"\x01Ns.", "an integer outside int64"),
        (b"\x80\x02}K\x01K\x02\x86Ns.", "refuses a dict key or set element of type tuple"),
        (b"\x80\x04(K\x01K\x02\x86\x91.", "set element of type tuple"),
        (b"(G?\xf0\x00\x00\x00\x00\x00\x00Nd.", "set element of type float"),
        # A memo index no pickler writes.
        (b"Np99999999999\n.", "refuses a memo index"),
    ],
)
def test_refuses_container_abuse(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(raw)
    with pytest.raises(InvalidInputError, match=message):
        read_competition_pickle(path)


# ----------------------------------------------------------------------- validation


def _error(tmp_path: Path, obj: object) -> str:
    with pytest.raises(InvalidInputError) as info:
        read_competition_pickle(_write(tmp_path / "t.pkl", obj))
    return str(info.value)


def test_top_level_must_be_a_dict(tmp_path: Path) -> None:
    assert "expected a dict" in _error(tmp_path, [_images(2), np.arange(2)])


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({b"data": _images(2)}, "missing key(s) b'ids'"),
        ({b"ids": np.arange(2)}, "missing key(s) b'data'"),
        (_valid() | {b"labels": [0, 1]}, "unexpected key(s) b'labels'"),
        ({"data": _images(2), "ids": np.arange(2)}, "must be bytes"),
        ({}, "missing key(s) b'data', b'ids'"),
    ],
)
def test_keys(tmp_path: Path, obj: dict, expected: str) -> None:
    assert expected in _error(tmp_path, obj)


@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.float32, np.int8])
def test_image_dtype(tmp_path: Path, dtype: type) -> None:
    obj = _valid() | {b"data": _images(4).astype(dtype)}
    assert f"b'data' has dtype {np.dtype(dtype)}, expected uint8" in _error(tmp_path, obj)


def test_images_must_be_an_array(tmp_path: Path) -> None:
    obj = _valid(2) | {b"data": _images(2).tolist()}
    assert "b'data' is a list, expected a numpy uint8 array" in _error(tmp_path, obj)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((32, 32, 3), "a single image"),
        ((4, 3, 32, 32), "looks channels-first"),
        ((4, 32, 32, 4), "4 channels; expected 3"),
        ((4, 32, 32, 1), "1 channels; expected 3"),
        ((4, 3072), "flat rows"),
        ((4, 28, 28, 3), "has shape (4, 28, 28, 3), expected (N, 32, 32, 3)"),
        ((2, 4, 32, 32, 3), "expected (N, 32, 32, 3)"),
        ((0, 32, 32, 3), "holds no images"),
    ],
)
def test_image_shape(tmp_path: Path, shape: tuple, expected: str) -> None:
    n = shape[0] if len(shape) in (2, 4) else 1
    obj = {b"data": np.zeros(shape, np.uint8), b"ids": np.arange(n)}
    assert expected in _error(tmp_path, obj)


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (np.arange(3), "b'ids' has 3 entries but b'data' has 4 images"),
        (np.arange(5), "b'ids' has 5 entries but b'data' has 4 images"),
        (np.arange(4, dtype=np.float64), "b'ids' has dtype float64, expected an integer dtype"),
        (np.array(["a", "b", "c", "d"]), "b'ids' has dtype <U1, expected an integer dtype"),
        (np.array([True, False, True, False]), "b'ids' has dtype bool"),
        (["a", "b", "c", "d"], "b'ids' holds 'a' (str), expected integers"),
        ([1.0, 2.0, 3.0, 4.0], "b'ids' holds 1.0 (float), expected integers"),
        ([True, False, 1, 2], "b'ids' holds True (bool)"),
        (np.arange(4).reshape(2, 2), "b'ids' has shape (2, 2), expected (N,)"),
        (np.array([2**63, 1, 2, 3], dtype=np.uint64), "outside int64"),
        ({1, 2, 3, 4}, "b'ids' is a set"),
        (None, "b'ids' is a NoneType"),
    ],
)
def test_ids(tmp_path: Path, ids: object, expected: str) -> None:
    assert expected in _error(tmp_path, {b"data": _images(4), b"ids": ids})


def test_duplicate_ids_are_named(tmp_path: Path) -> None:
    ids = np.array([1, 1, 2, 3, 3, 4])
    message = _error(tmp_path, {b"data": _images(6), b"ids": ids})
    assert "repeats 2 id(s): 1, 3" in message
    many = np.repeat(np.arange(7), 2)  # seven ids, each twice
    message = _error(tmp_path, {b"data": _images(14), b"ids": many})
    assert "repeats 7 id(s): 0, 1, 2, 3, 4 and 2 more" in message


# --------------------------------------------------------------------- broken files


def test_truncated_bytes(tmp_path: Path) -> None:
    whole = pickle.dumps(_valid(), protocol=4)
    for cut in (len(whole) - 100, 50, 3):
        path = tmp_path / "t.pkl"
        path.write_bytes(whole[:cut])
        with pytest.raises(InvalidInputError, match="is not a valid pickle"):
            read_competition_pickle(path)


@pytest.mark.parametrize(
    "raw",
    [b"hello world", b"\x00\x01\x02", b"ID,Labels\n1,2\n", b"\x80\x05\xff"],
)
def test_not_a_pickle(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "t.pkl"
    path.write_bytes(raw)
    with pytest.raises(InvalidInputError, match="is not a valid pickle"):
        read_competition_pickle(path)


def test_random_bytes_only_ever_raise_invalid_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    whole = bytearray(pickle.dumps(_valid(2), protocol=2))
    path = tmp_path / "t.pkl"
    for _ in range(200):
        mutated = whole.copy()
        for at in rng.integers(0, len(mutated), 3):
            mutated[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(mutated))
        # A mutation may leave a valid file; any failure must be InvalidInputError.
        with contextlib.suppress(InvalidInputError):
            read_competition_pickle(path)
    for n in range(1, 40):
        path.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        with pytest.raises(InvalidInputError):
            read_competition_pickle(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "t.pkl"
    path.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="is empty, not a valid pickle"):
        read_competition_pickle(path)


def test_out_of_band_buffers_are_not_a_valid_file(tmp_path: Path) -> None:
    raw = pickle.dumps(_valid(), protocol=5, buffer_callback=lambda buffer: False)
    path = tmp_path / "t.pkl"
    path.write_bytes(raw)
    with pytest.raises(InvalidInputError, match="is not a valid pickle"):
        read_competition_pickle(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file"):
        read_competition_pickle(tmp_path / "absent.pkl")
    with pytest.raises(InvalidInputError, match="is not a file"):
        read_competition_pickle(tmp_path)


def test_oversize_is_refused_before_reading(tmp_path: Path, monkeypatch) -> None:
    path = _write(tmp_path / "big.pkl", _valid(8))
    size = path.stat().st_size

    def no_open(_uri):
        raise AssertionError("opened a file over the size limit")

    with monkeypatch.context() as patch:
        patch.setattr(uri, "open_uri", no_open)
        with pytest.raises(
            InvalidInputError, match=f"is {size} bytes, more than the limit of 1000"
        ):
            read_competition_pickle(path, max_bytes=1000)
    assert len(read_competition_pickle(path, max_bytes=size)[0]) == 8


def test_oversize_is_refused_even_when_the_size_lied(tmp_path: Path, monkeypatch) -> None:
    path = _write(tmp_path / "big.pkl", _valid(8))
    monkeypatch.setattr(uri, "_uri_size", lambda _: 10)  # a file that grew after stat
    with pytest.raises(InvalidInputError, match="more than the limit of 1000"):
        read_competition_pickle(path, max_bytes=1000)
