"""Bad input through the command line: each case gets a specific error, exit status 1,
and nothing is written. No payload in a hostile pickle ever runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from tests.conftest import COMPETITION_SAMPLE
from tests.conftest import SHARED_PARQUET as PARQUET

pytestmark = pytest.mark.usefixtures("prefect_harness")



def _call(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle that calls module.name(arg) when loaded."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


def _malicious(sentinel: Path) -> dict[str, bytes]:
    touch = f"touch {sentinel}"
    code = f"open({str(sentinel)!r}, 'w').close()"
    import_os = b"cbuiltins\n__import__\n(Vos\ntR"
    return {
        "os.system": _call("os", "system", touch),
        "posix.system": _call("posix", "system", touch),
        "subprocess.Popen": b"csubprocess\nPopen\n((Vtouch\nV" + str(sentinel).encode()
        + b"\nltR.",
        "builtins.eval": _call("builtins", "eval", code),
        "builtins.exec": _call("builtins", "exec", code),
        "builtins.__import__": _call("builtins", "__import__", "os"),
        # getattr(__import__('os'), 'system')('touch ...')
        "getattr chain": b"cbuiltins\ngetattr\n(" + import_os + b"Vsystem\ntR(V"
        + touch.encode() + b"\ntR.",
        # a numpy object array whose element is the payload
        "numpy object array": pickle.dumps(np.array([_Payload(touch)], dtype=object)),
        "copyreg._reconstructor": b"ccopyreg\n_reconstructor\n(cos\n_wrap_close\nc"
        b"builtins\nobject\nNtR.",
        "nested pickle": _call("pickle", "loads", "cos\nsystem\n(Vtouch x\ntR."),
        "runpy": _call("runpy", "run_path", str(sentinel)),
        "functools.partial": b"cfunctools\npartial\n(cos\nsystem\nV" + touch.encode()
        + b"\ntR(tR.",
        "payload inside a valid dict": pickle.dumps(
            {b"data": np.zeros((1, 32, 32, 3), np.uint8), b"ids": _Payload(touch)}),
    }


class _Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def _valid(n=4):
    return {b"data": np.zeros((n, 32, 32, 3), np.uint8), b"ids": np.arange(n)}


def _malformed(tmp: Path) -> dict[str, bytes]:
    good = pickle.dumps(_valid())
    return {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "not a pickle": b"ID,Labels\n0,1\n",
        "a list, not a dict": pickle.dumps([1, 2, 3]),
        "missing b'ids'": pickle.dumps({b"data": _valid()[b"data"]}),
        "extra key": pickle.dumps({**_valid(), b"labels": np.zeros(4)}),
        "float64 data": pickle.dumps({**_valid(), b"data": np.zeros((4, 32, 32, 3))}),
        "int16 data": pickle.dumps({**_valid(), b"data": np.zeros((4, 32, 32, 3), np.int16)}),
        "shape (32, 32)": pickle.dumps({b"data": np.zeros((32, 32), np.uint8),
                                        b"ids": np.arange(1)}),
        "shape (N, 3, 32, 32)": pickle.dumps({**_valid(),
                                              b"data": np.zeros((4, 3, 32, 32), np.uint8)}),
        "shape (N, 32, 32, 4)": pickle.dumps({**_valid(),
                                              b"data": np.zeros((4, 32, 32, 4), np.uint8)}),
        "N = 0": pickle.dumps(_valid(0)),
        "ids of another length": pickle.dumps({**_valid(), b"ids": np.arange(5)}),
        "duplicate ids": pickle.dumps({**_valid(), b"ids": np.array([1, 2, 2, 3])}),
        "non-integer ids": pickle.dumps({**_valid(), b"ids": np.array([0.5, 1, 2, 3])}),
        # 300,000 empty sets from 300 KB: refused at the opcode budget, not built.
        "opcode flood": b"\x80\x04](" + b"\x8f" * 300_000 + b"e.",
        # _codecs.encode called 50 times on one 100 KB text: refused at the copy budget.
        "one text encoded many times": b"\x80\x02c_codecs\nencode\nq\x00X\xa0\x86\x01\x00"
        + b"a" * 100_000 + b"q\x01X\x06\x00\x00\x00latin1q\x02]("
        + b"h\x00h\x01h\x02\x86R" * 50 + b"e.",
    }


def _score(state: Path, input_path: Path, capsys) -> tuple[int, str]:
    code = main(["--state-dir", str(state), "score", "--input", str(input_path),
                 "--no-tta"])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def _written(state: Path) -> list[Path]:
    objects = state / "objects"
    return [p for p in objects.rglob("*") if p.is_file()] if objects.exists() else []


def test_malicious_pickles_are_refused_and_never_run(state, tmp_path, capsys):
    sentinel = tmp_path / "PWNED"
    cases = _malicious(sentinel)
    assert len(cases) >= 12
    for name, payload in cases.items():
        path = tmp_path / "evil.pkl"
        path.write_bytes(payload)
        code, message = _score(state, path, capsys)
        assert code == 1, name
        assert message.startswith("error: ") and "evil.pkl" in message, (name, message)
        assert not sentinel.exists(), f"{name}: the payload ran"
    assert _written(state) == []


def test_malformed_competition_files_get_specific_errors(state, tmp_path, capsys):
    cases = _malformed(tmp_path)
    assert len(cases) >= 12
    messages = {}
    for name, payload in cases.items():
        path = tmp_path / "bad.pkl"
        path.write_bytes(payload)
        code, messages[name] = _score(state, path, capsys)
        assert code == 1, (name, messages[name])
    expected = {"float64 data": "dtype float64, expected uint8", "int16 data": "int16",
                "duplicate ids": "repeats 1 id(s): 2", "missing b'ids'": "ids",
                "shape (N, 3, 32, 32)": "channels", "empty": "empty",
                "opcode flood": "pickle opcodes, the limit for a 300006-byte file",
                "one text encoded many times": "bytes of array data, the limit for a"}
    for name, fragment in expected.items():
        assert fragment in messages[name], (name, messages[name])
    assert len(set(messages.values())) >= 10  # specific, not one generic message
    assert _written(state) == []


def test_an_oversize_file_is_refused_before_it_is_read(state, tmp_path, capsys):
    path = tmp_path / "huge.pkl"
    with open(path, "wb") as f:
        f.truncate(300 * 2**20)  # sparse: 300 MiB on paper, nothing on disk
    code, message = _score(state, path, capsys)
    assert code == 1, message
    assert message.startswith("error: ") and "huge.pkl" in message, message
    # The size and the cap, both in bytes, so that the user can compare the two.
    assert f"is {300 * 2**20} bytes, more than the limit of {256 * 2**20}" in message, message
    assert _written(state) == []


def test_an_unknown_model_or_alias_is_a_clear_error(state, capsys):
    sample = COMPETITION_SAMPLE
    for uri, fragment in (("models:/nope@champion", "no registered model named 'nope'"),
                          ("models:/cifar10-resnet@nope", "no registered model")):
        code = main(["--state-dir", str(state), "score", "--input", str(sample),
                     "--model-uri", uri])
        err = capsys.readouterr().err
        assert code == 1 and fragment in err, err
    assert _written(state) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--variants", "medium"], "variants"),
        (["--recipe", "turbo"], "invalid choice"),
        (["--epochs", "-1"], "epochs"),
        (["--batch-size", "0"], "batch_size"),
        (["--lr", "nan"], "lr"),
        (["--ema", "1.5"], "ema"),
        (["--compile-mode", "turbo"], "compile_mode"),
    ],
)
def test_bad_configs_are_rejected_before_any_work(state, args, fragment, capsys):
    try:
        code = main(["--state-dir", str(state), "train", "--data", str(PARQUET), *args])
    except SystemExit as exc:  # argparse refuses unknown choices itself
        code = exc.code
    captured = capsys.readouterr()
    # The form names the field (batch_size), argparse the option (--batch-size).
    assert code in (1, 2) and fragment in captured.err.replace("-", "_"), captured.err
    assert not (state / "mlflow.db").exists() or _no_runs(state)


def _no_runs(state: Path) -> bool:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{state / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True).empty


def _parquet(path: Path, images: list[bytes], labels: list[int]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = pa.array([{"bytes": b, "path": None} for b in images],
                   pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"img": img, "label": pa.array(labels, pa.int64())}), path)
    return path


def _png(size=32) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, format="PNG")
    return buf.getvalue()


def _null_rows(path: Path, rows: int) -> Path:
    """A few KB that declare `rows` rows, none with an image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = pa.nulls(rows, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"img": img, "label": pa.array(np.zeros(rows, np.int64))}), path)
    return path


def test_bad_data_sources_fail_training_before_anything_is_registered(state, tmp_path,
                                                                      capsys, monkeypatch):
    # The unreachable URI: an S3 endpoint where nothing listens.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + b"\0" * 100)
    cases = {
        "corrupt parquet": (corrupt, "parquet"),
        "undecodable image": (_parquet(tmp_path / "u.parquet", [b"not an image"] * 20,
                                       [0] * 20), "cannot decode"),
        "label outside 0..9": (_parquet(tmp_path / "l.parquet", [_png()] * 20, [0] * 19 + [12]),
                               "label"),
        "wrong image size": (_parquet(tmp_path / "s.parquet", [_png(28)] * 20, [0] * 20),
                             "28x28"),
        "missing file": (tmp_path / "nope.parquet", "no such file"),
        "rows without images": (_null_rows(tmp_path / "n.parquet", 100_000),
                                "declares 100000 rows, more than the limit of 16384"),
        "unreachable URI": ("s3://bucket/train.parquet", "s3://bucket/train.parquet"),
    }
    for name, (source, fragment) in cases.items():
        code = main(["--state-dir", str(state), "train", "--data", str(source),
                     "--variants", "light", "--epochs", "1", "--val-size", "10"])
        err = capsys.readouterr().err
        assert code == 1, (name, err[-500:])
        assert fragment.lower() in err.lower(), (name, err[-500:])
    import mlflow

    assert mlflow.MlflowClient().search_registered_models() == []

