"""Hostile files are refused before they cost memory: each input below is small on disk and
would make a naive reader build hundreds of times its size.

Each case runs the reader in a child process and measures its peak resident memory over a
baseline taken after a warm-up read of a genuine file of the same kind. The budget is the
README's: refusing any input peaks under BUDGET_PER_FILE_BYTE x the file's size plus
BUDGET_FIXED. Each case also runs once with the caps lifted, to show that the measurement
sees the amplification it guards against (the child's address space is capped, so that run
ends in MemoryError rather than in swapping the machine).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
# The child resets its peak RSS through /proc (Linux 4.0 and later).
pytestmark = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="needs /proc/self/clear_refs to measure peak memory")
MiB = 2**20
BUDGET_PER_FILE_BYTE = 4
BUDGET_FIXED = 64 * MiB
HUGE = 2**50  # a cap lifted
# The child's address space above its own at the start of the read: enough for any refusal
# within budget, small enough that an uncapped reader fails fast.
ADDRESS_SPACE = 2048 * MiB

_CHILD = r"""
import importlib, json, pickle, resource, sys
from model.data import InvalidInputError, decode, load_arrays, read_competition_pickle

spec = json.loads(sys.argv[1])
decode._PARALLEL_DECODE_MIN_ROWS = 2**62  # one process, so that its peak is the reader's


def read(path, n):
    if spec["reader"] == "competition":
        return read_competition_pickle(path)
    if spec["reader"] == "pickle":  # the C unpickler, unrestricted: the reader this replaces
        with open(path, "rb") as f:
            return pickle.load(f)
    return load_arrays(path, cache_dir=f"{spec['cache']}/{n}")


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


for n, path in enumerate(spec["warm"]):  # imports and first-use allocations, off the books
    read(path, f"warm{n}")
resource.setrlimit(resource.RLIMIT_AS,
                   (status("VmSize") + spec["address_space"], resource.RLIM_INFINITY))
results = []
for n, overrides in enumerate(spec["runs"]):  # the caps as they are, then lifted
    for module, name, value in overrides:
        setattr(importlib.import_module(module), name, value)
    # The peak RSS of this process image (ru_maxrss would carry the pytest process's over
    # from before exec), reset to the current RSS by writing 5 to clear_refs.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    outcome, message = "accepted", ""
    try:
        read(spec["path"], f"run{n}")
    except InvalidInputError as e:
        outcome, message = "refused", str(e)
    except MemoryError as e:
        outcome, message = "out of memory", repr(e)
    results.append({"outcome": outcome, "message": message, "peak": status("VmHWM") - base})
print(json.dumps(results))
"""


def _run(reader: str, path: Path, tmp: Path, warm: list[Path],
         lifted: list[tuple[str, str, int]] | None = None) -> list[dict]:
    """[the read with the caps as they are, the read with `lifted` caps lifted], in one
    child process; each {outcome, message, peak bytes over the RSS before it}."""
    runs = [[]] if lifted is None else [[], lifted]
    spec = {"reader": reader, "path": str(path), "cache": str(tmp / "cache"),
            "warm": [str(p) for p in warm], "runs": runs, "address_space": ADDRESS_SPACE}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    results = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
    # A child that died (killed for memory, say) counts as not refusing, at any cost.
    crashed = {"outcome": f"crashed ({done.returncode})", "message": done.stderr[-2000:],
               "peak": HUGE}
    return results + [crashed] * (len(runs) - len(results))


def _budget(path: Path) -> int:
    return BUDGET_PER_FILE_BYTE * path.stat().st_size + BUDGET_FIXED


# ------------------------------------------------------------------- hostile pickles


def _codecs_reuse(path: Path) -> None:
    """Protocol 2's `_codecs.encode(text, 'latin1')`, called 600 times on one memoised
    1 MiB text: 600 MiB of bytes from a 1 MiB file."""
    text = "a" * MiB
    out = bytearray(b"\x80\x02c_codecs\nencode\nq\x00")
    out += b"X" + struct.pack("<I", len(text)) + text.encode() + b"q\x01"
    out += b"X\x06\x00\x00\x00latin1q\x02]("
    out += b"h\x00h\x01h\x02\x86R" * 600  # encode(text, 'latin1'), each a fresh copy
    path.write_bytes(bytes(out + b"e."))


def _build_reuse(path: Path) -> None:
    """600 arrays whose state names one memoised 1 MiB buffer with a byte-swapped dtype,
    which numpy copies (and swaps) for each: 600 MiB from a 1 MiB file."""
    raw = bytes(MiB)
    out = bytearray(b"\x80\x03cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01")
    out += b"cnumpy\ndtype\nX\x02\x00\x00\x00i8K\x00K\x01\x87R"  # dtype('i8'), then big-endian:
    out += b"(K\x03X\x01\x00\x00\x00>NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tbq\x02"
    out += b"B" + struct.pack("<I", len(raw)) + raw + b"q\x03]("
    array = b"h\x00h\x01K\x00\x85C\x01b\x87R"  # _reconstruct(ndarray, (0,), b'b')
    array += b"(K\x01J" + struct.pack("<i", len(raw) // 8) + b"\x85h\x02\x89h\x03tb"  # BUILD
    out += array * 600
    path.write_bytes(bytes(out + b"e."))


def _opcode_flood(path: Path) -> None:
    """A list of 512 Ki empty sets: one opcode byte each, 216 bytes each in memory."""
    path.write_bytes(b"\x80\x04](" + b"\x8f" * (MiB // 2) + b"e.")


def _huge_memo_index(path: Path) -> None:
    """A genuine competition file that memoises one object at index 2**31: the C unpickler
    sizes its memo table by the index (32 GiB); a dict does not."""
    valid = {b"data": np.zeros((4, 32, 32, 3), np.uint8), b"ids": np.arange(4)}
    body = pickle.dumps(valid, protocol=4)
    assert body.endswith(b".")
    path.write_bytes(body[:-1] + b"r" + struct.pack("<I", 2**31) + b".")


# ------------------------------------------------------------------- hostile sources

_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
            "test_batch")


def _meta_name_reuse(path: Path) -> None:
    """A cifar-10-python folder whose batches.meta lists one 1 MiB class name 400 times:
    decoding every name would take 400 MiB."""
    path.mkdir()
    name = b"n" * MiB
    (path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [name] * 400}, 2))
    for other in _BATCHES:
        (path / other).write_bytes(b"")


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path: Path, blobs, labels, **options) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = pa.StructArray.from_arrays([blobs, pa.nulls(len(blobs), pa.string())],
                                     ["bytes", "path"])
    # Without the stored Arrow schema a reader gets plain binary back, dictionary or not.
    pq.write_table(pa.table({"img": img, "label": labels}), path, store_schema=False,
                   **options)


def _many_rows(path: Path) -> None:
    """Two million rows of one small PNG, dictionary-encoded: a few KB on disk, 6 GiB of
    pixels once decoded."""
    import pyarrow as pa

    rows = 2_000_000
    blobs = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)),
                                           pa.array([_png()], pa.binary()))
    _parquet(path, blobs, pa.array(np.zeros(rows, np.int64)), compression="zstd")


def _dictionary_bomb(path: Path) -> None:
    """400 rows that all name one dictionary entry of just under 1 MiB: under 1 KB on disk,
    400 MiB once Arrow copies the entry into every row."""
    import pyarrow as pa

    rows = 400
    blobs = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)),
                                           pa.array([bytes(MiB - 64)], pa.binary()))
    _parquet(path, blobs, pa.array(np.zeros(rows, np.int64)), compression="zstd")


def _compression_bomb(path: Path) -> None:
    """One row of 64 MiB of zeros: a few KB once compressed."""
    import pyarrow as pa

    _parquet(path, pa.array([bytes(64 * MiB)], pa.binary()), pa.array([0], pa.int64()),
             compression="zstd", use_dictionary=False)


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


def _oversized_member(path: Path) -> None:
    """A .tar.gz whose data_batch_1 is 160 MiB of zeros: ~160 KB compressed."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 160 * MiB
        tar.addfile(info, io.BufferedReader(_Zeros(info.size)))


def _lying_member_header(path: Path) -> None:
    """A .tar.gz whose data_batch_1 header claims 8 GiB over 16 bytes of data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 16
        tar.addfile(info, io.BytesIO(bytes(16)))
    block = bytearray(buf.getvalue())
    block[124:136] = b"%011o\0" % (8 * 2**30 - 1)  # the size field, octal
    block[148:156] = b" " * 8  # the checksum is summed with its own field blank
    block[148:156] = b"%06o\0 " % sum(block[:512])
    path.write_bytes(gzip.compress(bytes(block)))


def _warm(tmp: Path, name: str) -> list[Path]:
    """Genuine files of the kind `name` is, for the child to read before measuring."""
    import pyarrow as pa

    warm = tmp / "warm"
    warm.mkdir()
    if name.endswith(".pkl"):
        path = warm / "competition.pkl"
        path.write_bytes(pickle.dumps({b"data": np.zeros((2, 32, 32, 3), np.uint8),
                                       b"ids": np.arange(2)}, protocol=2))
        return [path]
    if name.endswith(".parquet"):
        path = warm / "train.parquet"
        _parquet(path, pa.array([_png()] * 10, pa.binary()), pa.array(np.arange(10)))
        return [path]
    folder = warm / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for other in _BATCHES:
        (folder / other).write_bytes(pickle.dumps(batch, 2))
    names = [f"c{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, 2))
    tarball = warm / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return [folder, tarball]


_PARQUET_CAPS = [("model.data.parquet", name, HUGE) for name in
                 ("MAX_ROWS", "ROWS_FLOOR", "ENCODED_BYTES_FLOOR", "MAX_IMAGE_BYTES")]
_CASES: dict[str, tuple[str, str, Callable[[Path], None], str, list]] = {
    # name: (reader, file name, writer, fragment of the refusal, the caps to lift)
    "pickle reuses a text for _codecs.encode": (
        "competition", "codecs.pkl", _codecs_reuse, "bytes of array data, the limit",
        [("model.data.unpickle", "COPY_SLACK_BYTES", HUGE)]),
    "pickle rebuilds arrays from one buffer": (
        "competition", "build.pkl", _build_reuse, "bytes of array data, the limit",
        [("model.data.unpickle", "COPY_SLACK_BYTES", HUGE)]),
    "pickle floods opcodes": (
        "competition", "flood.pkl", _opcode_flood, "pickle opcodes, the limit",
        [("model.data.unpickle", "OPCODES_FIXED", HUGE)]),
    "batches.meta repeats a long name": (
        "source", "meta-folder", _meta_name_reuse, "a class name is longer than 256 bytes",
        [("model.data.cifar", "_MAX_NAME_BYTES", HUGE)]),
    "parquet declares millions of rows": (
        "source", "rows.parquet", _many_rows, "declares 2000000 rows, more than the limit",
        _PARQUET_CAPS),
    "parquet names one large entry in every row": (
        "source", "dict.parquet", _dictionary_bomb, "its images take more than",
        _PARQUET_CAPS),
    "parquet page decompresses to 64 MiB": (
        "source", "zeros.parquet", _compression_bomb, "its pages decompress to 671",
        _PARQUET_CAPS),
    "tar member of 160 MiB": (
        "source", "big.tar.gz", _oversized_member, "is 167772160 bytes, more than the limit",
        [("model.data.cifar", "MAX_MEMBER_BYTES", HUGE)]),
    "tar header claims 8 GiB": (
        "source", "lying.tar.gz", _lying_member_header, "is 8589934591 bytes, more than",
        [("model.data.cifar", "MAX_MEMBER_BYTES", HUGE)]),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_hostile_input_is_refused_within_the_memory_budget(case: str, tmp_path: Path) -> None:
    reader, name, write, fragment, caps = _CASES[case]
    path = tmp_path / name
    write(path)
    warm = _warm(tmp_path, name)
    budget = _budget(path) if path.is_file() else _budget(path / "batches.meta")

    capped, lifted = _run(reader, path, tmp_path, warm, caps)
    assert capped["outcome"] == "refused", capped
    message = capped["message"]
    assert "\n" not in message and str(path) in message and fragment in message, message
    assert capped["peak"] < budget, (capped["peak"] / MiB, budget / MiB)
    # The measurement sees what the caps prevent: lifted, the same file costs more.
    assert lifted["peak"] > budget or lifted["outcome"] == "out of memory", lifted


def test_a_huge_memo_index_costs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "memo.pkl"
    _huge_memo_index(path)
    warm = _warm(tmp_path, path.name)
    (restricted,) = _run("competition", path, tmp_path, warm)
    assert restricted["outcome"] == "accepted", restricted  # a genuine file, oddly memoised
    assert restricted["peak"] < _budget(path), restricted
    (plain,) = _run("pickle", path, tmp_path, warm)  # the same file, unrestricted
    assert plain["outcome"] == "out of memory", plain

