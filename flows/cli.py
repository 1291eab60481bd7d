"""`cifar-pipeline`: the command line (`cifar-pipeline --help`; README, The command line).

Exit status: 0 done; 1 bad input or a (partial) failure; 2 usage; 130, 143 an interrupt.
Every command takes --state-dir, before or after the command's name.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from model.config import ConfigError
from model.errors import UserError
from tasks.settings import CHAMPION_URI

FLOW_COMMANDS = {"run", "train", "score"}  # they run Prefect flows in this process
STATE_DIR_HELP = ("home of the embedded defaults: MLflow database and artifacts, object "
                  "store, Prefect database (default $CIFAR_STATE_DIR, else ./.pipeline)")


def _configure_environment(state_dir: str | None, command: str = "") -> Path:
    """Set before prefect or mlflow are imported: both read their settings at import.
    Raises StateDirError for a state directory that cannot be used."""
    from tasks.settings import bypass_proxy_for_loopback, check_state_dir, sqlite_uri

    state = Path(state_dir or os.environ.get("CIFAR_STATE_DIR") or ".pipeline").resolve()
    check_state_dir(state, writable=command != "models")  # `models` only reads
    os.environ["CIFAR_STATE_DIR"] = str(state)
    if not os.environ.get("PREFECT_API_URL"):
        # The embedded default: a Prefect server this command starts, its database here.
        home = Path(os.environ.setdefault("PREFECT_HOME", str(state / "prefect")))
        if not (os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
                or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")):
            # Prefect pastes PREFECT_HOME into its URL unquoted: a `?` or `%` in the path
            # would put the database somewhere else.
            os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = sqlite_uri(
                home / "prefect.db", "sqlite+aiosqlite")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # model/ logs batch progress through the standard logging module; show it in the runs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "model")
    # The first start migrates a fresh SQLite database; a busy laptop needs more than 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    bypass_proxy_for_loopback(prefect=command in FLOW_COMMANDS | {"stack"})
    return state


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "completion":  # needs no state directory
        import shtab

        print(shtab.complete(parser, shell=args.shell))
        return 0
    try:
        from flows.config import RUN_KEY, RUN_KEY_RULE

        if getattr(args, "run_key", None) is not None and not re.fullmatch(RUN_KEY, args.run_key):
            raise ConfigError(f"--run-key {args.run_key!r} is not a run key: {RUN_KEY_RULE}")
        state = _configure_environment(args.state_dir, args.command)
        if args.command == "stack":
            # infra.stack needs none of the seconds of importing torch and mlflow below.
            return cmd_stack(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import logging

    logging.getLogger("model").setLevel(logging.INFO)  # batch progress of slow epochs
    if getattr(args, "run_key", False) is None:
        # Known from the start, so that an interrupt or a failure can say how to resume.
        import uuid

        args.run_key = uuid.uuid4().hex[:12]
    from flows import interrupts
    from tasks.settings import Settings, remove_stray_sqlite_dir

    resume = (interrupts.resume_command(argv, state, args.run_key)
              if getattr(args, "run_key", None) else None)
    server: list = []  # the embedded Prefect server, stopped at exit
    guard = interrupts.InterruptGuard(
        lambda guard: interrupts.interrupted_line(guard, args.command, resume),
        owns_process=argv is None,  # the console script, not a caller in its own process
        keep_pids=lambda: {s.pid for s in server})
    with guard:
        try:
            if precheck := getattr(args, "precheck", None):
                precheck(args)  # bad input is refused before anything slow starts
            from tasks.metrics import TrackingUnavailableError
            from tasks.settings import check_tracking_server

            try:
                # Before the seconds of importing and starting Prefect.
                check_tracking_server(Settings.from_env().tracking_uri)
            except TrackingUnavailableError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            if (args.command in FLOW_COMMANDS and guard.owns_process
                    and not os.environ.get("PREFECT_API_URL")):
                # A caller in its own process keeps Prefect as it has set it up.
                server.append(interrupts.start_prefect_server(state))
            return args.handler(args)
        except BaseException as exc:
            if guard.signum is not None or isinstance(exc, KeyboardInterrupt):
                return guard.interrupted(exc)
            message = _error_message(exc, resume)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            return 1
        finally:
            remove_stray_sqlite_dir(Settings.from_env().tracking_uri)


def _error_message(exc: BaseException, resume: str | None) -> str | None:
    """The one line for a failure the user can act on; None for a bug (a traceback)."""
    from pydantic import ValidationError  # a form's refusal of a parameter

    from tasks.settings import disk_error_message, tracking_error_message

    if isinstance(exc, UserError | ValidationError):
        message, resumable = str(exc), getattr(exc, "resumable", False)
    else:  # a disk that filled up or turned read-only, a tracking server gone silent
        message = disk_error_message(exc) or tracking_error_message(exc)
        if message is None:
            return None
        resumable = True
    # The checkpoints of finished epochs are kept under the run key.
    return f"{message}; to resume: {resume}" if resumable and resume else message


def cmd_run(args) -> int:
    import numpy as np

    from flows.config import data_config
    from flows.summary import print_json, print_summary, summary_document
    from flows.train import TrainResnetsConfig, train
    from model.config import given
    from model.data import write_competition_pickle
    from model.profiles import resolve_profile
    from tasks.data import resolve_source
    from tasks.progress import terminal_bars
    from tasks.settings import Settings

    settings = Settings.from_env()
    profile, why = resolve_profile(args.profile)
    print(why, file=sys.stderr if args.json else sys.stdout, flush=True)
    options = given(args, TrainResnetsConfig.model_fields)
    recipe = options.get("recipe", TrainResnetsConfig.model_fields["recipe"].default)
    config = TrainResnetsConfig(**{
        "val_size": profile.val_size, "train_size": profile.train_size,
        **profile.overrides_for(recipe), **options, "score_after": True})
    self_check = None
    if args.competition_file is None:
        # Score the validation split in the competition's format, so that the end of the
        # job can say how accurate the submitted file would be.
        source, _ = resolve_source(config.data_source, settings)
        data = data_config(config).load(source, cache_dir=settings.cache_dir)
        path = settings.state_dir / "selfcheck" / f"{data.val.digest[:16]}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_competition_pickle(path, np.arange(len(data.val)), data.val.images)
        self_check = data.val.labels
        config = config.model_copy(update={"competition_file": str(path)})
    with terminal_bars():
        summary = train(config)
    doc = summary_document(summary, settings, self_check)
    print_json(doc) if args.json else print_summary(doc)
    return 0


def check_seeds(args) -> None:
    """A repeated seed would train the same job twice: refused before anything starts."""
    seeds = args.seeds or []
    if repeated := sorted({seed for seed in seeds if seeds.count(seed) > 1}):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))} repeats "
                         f"{', '.join(map(str, repeated))}: give each seed once")


def cmd_train(args) -> int:
    from flows.summary import print_json, print_summary, summary_document
    from flows.train import TrainResnetsConfig, train
    from model.config import given
    from tasks.progress import terminal_bars
    from tasks.settings import Settings

    with terminal_bars():
        summary = train(TrainResnetsConfig(**given(args, TrainResnetsConfig.model_fields)))
    doc = summary_document(summary, Settings.from_env(), None)
    print_json(doc) if args.json else print_summary(doc)
    return 0


def check_score_input(args) -> None:
    """`score`'s precheck: the competition file, read and checked in about a second, before
    Prefect starts (tens of seconds); the flow reads and checks it again."""
    from model.data import read_competition_pickle

    read_competition_pickle(args.input)


def cmd_score(args) -> int:
    from flows.score import ScoreConfig, score
    from flows.summary import print_json
    from tasks.progress import terminal_bars

    with terminal_bars():
        result = score(ScoreConfig(model_uri=args.model_uri, input_uri=args.input,
                                   output=args.output, tta=not args.no_tta, device=args.device))
    if args.json:
        print_json(result)
        return 0
    state = "found existing" if result.get("reused") else "wrote"
    print(f"{state} {result['rows']} predictions of {result['model_name']} "
          f"v{result['model_version']}:")
    for name, meta in result["files"].items():
        print(f"  {name:<20} {meta['uri']}")
    return 0


def cmd_models(args) -> int:
    import mlflow

    from flows.summary import models_document, print_json, print_models
    from tasks.settings import Settings

    # Only reads: no experiment created, no lock taken (a read-only state directory).
    mlflow.set_tracking_uri(Settings.from_env().tracking_uri)
    doc = models_document(mlflow.MlflowClient(), args.compare)
    print_json(doc) if args.json else print_models(doc)
    return 0


def cmd_predict(args) -> int:
    from flows.predict import run

    return run(args.inputs, args.model_uri, tta=not args.no_tta, device=args.device,
               as_json=args.json, out=sys.stdout, err=sys.stderr)


def cmd_serve(args) -> int:
    from tasks.serving import serve
    from tasks.settings import Settings

    Settings.from_env().apply()
    return serve(args.model_uri, args.host, args.port)


def cmd_stack(args) -> int:
    from infra.stack import main

    up_only = {"--workers": args.workers, "--cpu-slots": args.cpu_slots,
               "--no-deploy": args.no_deploy, "--auth": args.auth}
    given = [flag for flag, value in up_only.items() if value not in (None, False)]
    if given and args.action != "up":
        raise ConfigError(f"{', '.join(given)} only go with `stack up`")
    cmd = [args.action, "--state-dir", os.environ["CIFAR_STATE_DIR"]]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    cmd += [flag for flag in ("--cpu-slots", "--no-deploy", "--auth") if up_only[flag]]
    return main(cmd)


def _add_train_options(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None):
    # The form's own fields, generated: a new training option appears here by itself.
    # Imported here, not at the top: pydantic and the model config cost little, and
    # `stack` needs neither.
    from flows.config import TrainResnetsConfig, add_form_arguments

    add_form_arguments(parser, TrainResnetsConfig, only=only,
                       aliases={"data_source": "--data", "seeds": "--seed"})


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which registered model predicts, and how: `score` and `predict` alike."""
    parser.add_argument("--model-uri", default=CHAMPION_URI, help="models:/NAME@ALIAS or "
                        f"models:/NAME/VERSION (default {CHAMPION_URI})")
    parser.add_argument("--no-tta", action="store_true", help="predict each image as it is, "
                        "without averaging it with its mirror image")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, "
                        "cuda or cuda:N (default auto)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifar-pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--state-dir", help=STATE_DIR_HELP)
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="the main job: train both variants, promote, score")
    run.add_argument("--profile", default="auto", choices=["auto", "smoke", "quick", "full"],
                     help="training budget: auto = full on a GPU, quick on a CPU")
    # Without --competition-file, the validation split is scored in that format.
    _add_train_options(run, only=("competition_file", "data_source", "recipe", "variants",
                                  "seeds", "run_key"))
    run.set_defaults(handler=cmd_run, precheck=check_seeds)

    tr = sub.add_parser("train", help="train, register and promote; every option of the "
                        "train-resnets flow's form")
    _add_train_options(tr)
    tr.set_defaults(handler=cmd_train, precheck=check_seeds)

    sc = sub.add_parser("score", help="predict a competition file with a registered model")
    sc.add_argument("--input", required=True, help="competition pickle: path, file:// or "
                    "s3:// URI; checked before anything starts")
    sc.add_argument("--output", default="predictions", help="a key prefix in the object "
                    "store, or a full s3:// or file:// URI (default predictions)")
    _add_model_options(sc)
    sc.set_defaults(handler=cmd_score, precheck=check_score_input)

    pr = sub.add_parser("predict", help="classify image files (PNG, JPEG), folders of them "
                        "or a competition pickle, and print a table")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="an image file of any size "
                    "(centre-cropped square, resized to 32x32), a folder (its *.png, *.jpg, "
                    "*.jpeg) or a competition pickle (*.pkl, or an s3:// URI)")
    pr.add_argument("--json", action="store_true", help="print JSON (the model, each "
                    "image's class, confidence and ten probabilities, the failed inputs)")
    _add_model_options(pr)
    pr.set_defaults(handler=cmd_predict)

    md = sub.add_parser("models", help="list registered versions and aliases")
    md.add_argument("--compare", action="store_true", help="then, per data digest and "
                    "recipe: mean ± std of accuracy over seeds per variant, and deep − light "
                    "with its 95%% interval")
    md.set_defaults(handler=cmd_models)

    sv = sub.add_parser("serve", help="answer POST /invocations with a registered model "
                        "(MLflow's scoring server, with body-size and nesting limits)")
    sv.add_argument("--model-uri", default=CHAMPION_URI, help=f"default {CHAMPION_URI}")
    sv.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    sv.set_defaults(handler=cmd_serve)

    st = sub.add_parser("stack", help="local Prefect, MLflow and S3 servers plus workers "
                        "(python -m infra.stack)")
    st.add_argument("action", choices=["up", "down", "status"], help="up: start the servers "
                    "and workers; down: stop them; status: URLs, pids, health (exit 1 unless "
                    "all ok)")
    st.add_argument("--workers", type=int, help="gpu-pool workers (up; default one per GPU, "
                    "else 2 CPU slots)")
    st.add_argument("--cpu-slots", action="store_true", help="workers without a GPU (up)")
    st.add_argument("--no-deploy", action="store_true", help="skip prefect deploy (up)")
    st.add_argument("--auth", action="store_true", help="MLflow basic-auth and a Prefect "
                    "API auth string (up)")
    st.set_defaults(handler=cmd_stack)

    co = sub.add_parser("completion", help="print a shell completion script (README: "
                        "Shell completion)")
    co.add_argument("shell", choices=["bash", "zsh"], help="the shell it is for")

    for command in (run, tr, sc, md):
        command.add_argument("--json", action="store_true", help="print one JSON document "
                             "on stdout instead of the text (keys: README, JSON output)")
    for command in sub.choices.values():
        # After the command's name too; SUPPRESS keeps a value given before it.
        command.add_argument("--state-dir", default=argparse.SUPPRESS, help=STATE_DIR_HELP)
    return p


if __name__ == "__main__":
    sys.exit(main())
