"""The command line's promises that need no run: global options in either place, a help
line for every option."""

from __future__ import annotations

import argparse

import pytest

from flows.cli import _parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


COMMANDS = sorted(_commands())
MINIMAL_ARGS = {"score": ["--input", "f.pkl"], "predict": ["a.png"], "stack": ["status"],
                 "completion": ["bash"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_state_dir_is_taken_before_or_after_the_command(command):
    parser = _parser()
    rest = MINIMAL_ARGS.get(command, [])
    after = parser.parse_args([command, *rest, "--state-dir", "after"])
    before = parser.parse_args(["--state-dir", "before", command, *rest])
    neither = parser.parse_args([command, *rest])
    assert (after.state_dir, before.state_dir, neither.state_dir) == ("after", "before", None)


@pytest.mark.parametrize("command", ["top", *COMMANDS])
def test_every_option_has_a_help_line(command):
    parser = _parser() if command == "top" else _commands()[command]
    missing = [a.option_strings or [a.dest] for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction)
               and (not a.help or a.help == argparse.SUPPRESS)]
    assert missing == []


def test_predict_takes_several_inputs_and_its_options():
    args = _parser().parse_args(["predict", "a.png", "dir", "t.pkl", "--json", "--no-tta",
                                 "--model-uri", "models:/cifar10-resnet/3"])
    assert args.inputs == ["a.png", "dir", "t.pkl"] and args.json and args.no_tta
    assert args.model_uri == "models:/cifar10-resnet/3" and args.device == "auto"


def test_a_bad_competition_file_is_refused_before_prefect_mlflow_or_torch_load(tmp_path):
    """The refusal of `score`'s input must not wait for the heavy imports (seconds) or the
    embedded Prefect server: it runs first, and nothing heavy is imported by then."""
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({b"data": [1, 2], b"ids": [1]}))
    code = ("import sys, flows.cli as cli; rc = cli.main(['score', '--input', sys.argv[1], "
            "'--state-dir', sys.argv[2]]); "
            "print(rc, sorted(m for m in ('prefect', 'mlflow', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(bad), str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip().splitlines()[-1] == "1 []", done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and "bad.pkl" in done.stderr


def test_only_user_errors_become_one_line_and_a_bug_keeps_its_traceback():
    from pydantic import BaseModel, ValidationError

    from flows.cli import _error_message
    from model.config import ConfigError, TrainConfig
    from model.data import InvalidInputError
    from model.errors import UserError
    from model.images import ImageFileError
    from tasks.settings import StateDirError
    from tasks.storage import StorageError

    class Resumable(UserError):
        resumable = True

    for cls in (ConfigError, InvalidInputError, ImageFileError, StateDirError, StorageError):
        assert _error_message(cls("what to do"), "cmd") == "what to do", cls
    assert _error_message(Resumable("server down"), "cmd") == "server down; to resume: cmd"
    with pytest.raises(ConfigError) as refused:
        TrainConfig(precision="fp16")
    assert _error_message(refused.value, None).startswith("precision: ")

    class Form(BaseModel):
        epochs: int

    with pytest.raises(ValidationError) as invalid:
        Form(epochs="many")
    assert "epochs" in _error_message(invalid.value, None)
    # A programming error, though a ValueError or a KeyError: None, so main re-raises it.
    for bug in (ValueError("bad shape"), KeyError("val/acc"), TypeError("x")):
        assert _error_message(bug, "cmd") is None


@pytest.mark.parametrize("command", ["run", "train"])
def test_repeated_seeds_are_refused_by_the_precheck(command):
    """main() runs a command's precheck before Prefect, MLflow or torch start (the
    competition file's test above shows the order)."""
    from model.config import ConfigError

    args = _parser().parse_args([command, "--seeds", "2,0,2"])
    with pytest.raises(ConfigError, match=r"^--seeds 2,0,2 repeats 2: give each seed once$"):
        args.precheck(args)
    distinct = _parser().parse_args([command, "--seeds", "2,0"])
    distinct.precheck(distinct)


def test_run_takes_several_seeds():
    assert _parser().parse_args(["run", "--seeds", "0,1,2"]).seeds == [0, 1, 2]
    assert _parser().parse_args(["run", "--seed", "3"]).seeds == [3]
    assert _parser().parse_args(["models", "--compare"]).compare
