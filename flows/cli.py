"""`cifar-pipeline`: the command line.

    cifar-pipeline run [--profile auto|smoke|quick|full] [--competition-file F] [--data SRC]
    cifar-pipeline train [--variants deep,light] [--recipe fast] [--epochs N] ...
    cifar-pipeline score --input F [--model-uri models:/cifar10-resnet@champion]
    cifar-pipeline models
    cifar-pipeline stack up|down|status [--workers N] [--cpu-slots] [--no-deploy] [--auth]

Every command takes --state-dir (default ./.pipeline), the home of the embedded defaults:
the MLflow database and artifacts, the local object store, and Prefect's database.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_COMPETITION_NAME = "validation-as-competition.pkl"


def _configure_environment(state_dir: str | None) -> Path:
    """Set before prefect or mlflow are imported: both read their settings at import."""
    state = Path(state_dir or os.environ.get("CIFAR_STATE_DIR") or ".pipeline").resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.environ["CIFAR_STATE_DIR"] = str(state)
    if not os.environ.get("PREFECT_API_URL"):
        # The embedded default: an in-process Prefect API whose database lives here too.
        os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # model/ logs batch progress through the standard logging module; show it in the runs.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "model")
    # The first start migrates a fresh SQLite database; a busy laptop needs more than 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    return state


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _configure_environment(args.state_dir)
    import logging

    logging.getLogger("model").setLevel(logging.INFO)  # batch progress of slow epochs
    if args.command == "stack":
        # Only starts a script: spare it the seconds of importing torch and mlflow below.
        try:
            return cmd_stack(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    from pydantic import ValidationError

    from flows.train import JobsFailedError
    from model.checkpoint import CheckpointError
    from model.data import InvalidInputError
    from tasks.metrics import TrackingUnavailableError
    from tasks.registry import RegistryError
    from tasks.storage import StorageError

    try:
        return args.handler(args)
    except (ValidationError, InvalidInputError, RegistryError, StorageError, CheckpointError,
            JobsFailedError, TrackingUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_run(args) -> int:
    import numpy as np

    from flows.train import TrainConfig, train
    from model.data import load_dataset, write_competition_pickle
    from model.profiles import resolve_profile
    from tasks.data import resolve_source
    from tasks.settings import Settings

    settings = Settings.from_env()
    profile, why = resolve_profile(args.profile)
    print(why, flush=True)
    config = TrainConfig(
        variants=args.variants.split(","), recipe=args.recipe, data_source=args.data,
        val_size=profile.val_size, train_size=profile.train_size, seeds=[args.seed],
        **profile.overrides_for(args.recipe), score_after=True,
        competition_file=args.competition_file,
    )
    self_check = None
    if args.competition_file is None:
        # Score the validation split in the competition's format, so that the end of the
        # job can say how accurate the submitted file would be.
        source, _ = resolve_source(config.data_source)
        data = load_dataset(source, val_size=config.val_size, train_size=config.train_size,
                            seed=config.split_seed, cache_dir=settings.cache_dir)
        path = settings.state_dir / "selfcheck" / f"{data.val.digest[:16]}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_competition_pickle(path, np.arange(len(data.val)), data.val.images)
        self_check = data.val.labels
        config = config.model_copy(update={"competition_file": str(path)})
    summary = train(config)
    _print_summary(summary, settings, self_check)
    return 0


def cmd_train(args) -> int:
    from flows.train import TrainConfig, train
    from tasks.settings import Settings

    fields = dict(variants=args.variants.split(","), recipe=args.recipe, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, data_source=args.data,
                  val_size=args.val_size, train_size=args.train_size, device=args.device,
                  seeds=[int(s) for s in args.seeds.split(",")], compile=args.compile,
                  compile_mode=args.compile_mode, ema=args.ema, run_key=args.run_key)
    summary = train(TrainConfig(**{k: v for k, v in fields.items() if v is not None}))
    _print_summary(summary, Settings.from_env(), None)
    return 0


def cmd_score(args) -> int:
    from flows.score import ScoreConfig, score

    result = score(ScoreConfig(model_uri=args.model_uri, input_uri=args.input,
                               output=args.output, tta=not args.no_tta, device=args.device))
    state = "found existing" if result.get("reused") else "wrote"
    print(f"{state} {result['rows']} predictions of {result['model_name']} "
          f"v{result['model_version']}:")
    for name, meta in result["files"].items():
        print(f"  {name:<20} {meta['uri']}")
    return 0


def cmd_models(args) -> int:
    import mlflow

    from tasks.settings import REGISTERED_MODEL, Settings

    Settings.from_env().apply()
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    if not versions:
        print(f"no versions of {REGISTERED_MODEL} at {mlflow.get_tracking_uri()}")
        return 0
    aliases = client.get_registered_model(REGISTERED_MODEL).aliases
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    print(f"{'version':>7}  {'variant':<7} {'recipe':<9} {'val acc':>8}  {'aliases':<24} run")
    for mv in sorted(versions, key=lambda v: int(v.version)):
        acc = mv.tags.get("val_acc")
        print(f"{mv.version:>7}  {mv.tags.get('variant', '?'):<7} "
              f"{mv.tags.get('recipe', '?'):<9} "
              f"{(f'{100 * float(acc):.2f}%' if acc else '-'):>8}  "
              f"{', '.join(sorted(by_version.get(str(mv.version), []))):<24} {mv.run_id}")
    return 0


def cmd_stack(args) -> int:
    import subprocess

    import flows

    # infra/ ships with the source tree, not the package: it is run, never imported.
    script = Path(flows.__file__).resolve().parents[1] / "infra" / "stack.py"
    if not script.is_file():
        raise ValueError(f"{script} is missing: `stack` needs a source checkout of "
                         "cifar-pipeline (infra/ is not part of the installed package)")
    up_only = {"--workers": args.workers, "--cpu-slots": args.cpu_slots,
               "--no-deploy": args.no_deploy, "--auth": args.auth}
    given = [flag for flag, value in up_only.items() if value not in (None, False)]
    if given and args.action != "up":
        raise ValueError(f"{', '.join(given)} only go with `stack up`")
    cmd = [sys.executable, str(script), args.action, "--state-dir", os.environ["CIFAR_STATE_DIR"]]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    cmd += [flag for flag in ("--cpu-slots", "--no-deploy", "--auth") if up_only[flag]]
    return subprocess.call(cmd)


def _print_summary(summary: dict, settings, self_check) -> None:
    print("\nsummary")
    rows = [("MLflow tracking", settings.tracking_uri),
            ("MLflow parent run", summary["mlflow_run_id"]),
            ("data digest", summary["data_digest"][:16])]
    for job, version in summary["versions"].items():
        rows.append((f"  {job}", f"version {version}, val acc "
                                 f"{100 * summary['val_acc'][job]:.2f}%"))
    rows.append(("champion", f"models:/cifar10-resnet@champion = version "
                             f"{summary['champion']} ({summary['reason']})"))
    score = summary.get("score")
    if score:
        rows.append(("predictions", score["files"]["predictions.csv"]["uri"]))
        rows.append(("manifest", score["manifest_uri"]))
        if self_check is not None:
            accuracy = _csv_accuracy(score, self_check)
            rows.append(("self-check", f"{100 * accuracy:.2f}% of the validation split "
                                       "scored as a competition file"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _csv_accuracy(score: dict, labels) -> float:
    import numpy as np

    from tasks.storage import open_store

    text = open_store(score["store"]).get(f"{score['prefix']}/predictions.csv").decode()
    rows = [line.split(",") for line in text.strip().splitlines()[1:]]
    ids = np.array([int(r[0]) for r in rows])
    predicted = np.array([int(r[1]) for r in rows])
    return float((predicted == labels[ids]).mean())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifar-pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--state-dir", help="home of the embedded defaults (default ./.pipeline)")
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="the main job: train both variants, promote, score")
    run.add_argument("--profile", default="auto", choices=["auto", "smoke", "quick", "full"])
    run.add_argument("--competition-file", help="competition pickle to score (default: the "
                     "validation split in that format, as a self-check)")
    run.add_argument("--data", help="training data (default $CIFAR10_SOURCE, else download)")
    run.add_argument("--recipe", default="fast", choices=["reference", "paper", "fast"])
    run.add_argument("--variants", default="deep,light")
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(handler=cmd_run)

    tr = sub.add_parser("train", help="train, register and promote")
    tr.add_argument("--variants", default="deep,light")
    tr.add_argument("--recipe", default="fast", choices=["reference", "paper", "fast"])
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--seeds", default="0")
    tr.add_argument("--data")
    tr.add_argument("--val-size", type=int)
    tr.add_argument("--train-size", type=int)
    tr.add_argument("--device")
    tr.add_argument("--compile", action=argparse.BooleanOptionalAction,
                    help="torch.compile the training step (default: on for paper and fast on CUDA)")
    tr.add_argument("--compile-mode", help="default, reduce-overhead (CUDA graphs), "
                    "max-autotune or max-autotune-no-cudagraphs")
    tr.add_argument("--ema", type=float, help="weight EMA decay per step, e.g. 0.999")
    tr.add_argument("--run-key", help="share checkpoints with an earlier run to resume it")
    tr.set_defaults(handler=cmd_train)

    sc = sub.add_parser("score", help="predict a competition file with a registered model")
    sc.add_argument("--input", required=True, help="competition pickle: path or s3:// URI")
    sc.add_argument("--model-uri", default="models:/cifar10-resnet@champion")
    sc.add_argument("--output", default="predictions")
    sc.add_argument("--no-tta", action="store_true")
    sc.add_argument("--device", default="auto")
    sc.set_defaults(handler=cmd_score)

    md = sub.add_parser("models", help="list registered versions and aliases")
    md.set_defaults(handler=cmd_models)

    st = sub.add_parser("stack", help="local Prefect, MLflow and S3 servers plus workers "
                        "(infra/stack.py)")
    st.add_argument("action", choices=["up", "down", "status"])
    st.add_argument("--workers", type=int, help="gpu-pool workers (up; default one per GPU, "
                    "else 2 CPU slots)")
    st.add_argument("--cpu-slots", action="store_true", help="workers without a GPU (up)")
    st.add_argument("--no-deploy", action="store_true", help="skip prefect deploy (up)")
    st.add_argument("--auth", action="store_true", help="MLflow basic-auth and a Prefect "
                    "API auth string (up)")
    st.set_defaults(handler=cmd_stack)
    return p


if __name__ == "__main__":
    sys.exit(main())
