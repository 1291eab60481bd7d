"""Load on the local stack: many smoke-profile trainings and scorings at once, submitted
through the Prefect API, then checks that every run Completed, that each training
registered exactly one version and each scoring input left exactly one complete output
set, and that the API answered no request with a 5xx (its client's retries are off, so
none is hidden). Prints a throughput table; exits 1 if a check failed. See the README.

    python -m infra.loadtest --state-dir .stack [--trainings 20] [--scorings 50]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import secrets
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.procs import StackError, read_env_file

TRAIN_DEPLOYMENT = "train-variant/train-variant"
SCORE_DEPLOYMENT = "score-competition/score-competition"
BUCKET = "cifar-pipeline"
OUTPUT_FILES = ("predictions.csv", "predictions.parquet", "manifest.json")


@dataclass
class KindReport:
    kind: str
    submitted: int
    completed: int = 0
    failed: list[str] = field(default_factory=list)
    run_seconds: list[float] = field(default_factory=list)
    busy_seconds: float = 0.0  # first run's start to last run's end, as the server saw them

    @classmethod
    def of(cls, kind: str, runs: list) -> KindReport:
        timed = [r for r in runs if r.start_time and r.end_time]
        busy = max(r.end_time for r in timed) - min(r.start_time for r in timed) if timed else None
        return cls(kind, len(runs), completed=sum(r.state.is_completed() for r in runs),
                   failed=[f"{r.name}: {r.state.type.value} {r.state.message}"
                           for r in runs if not r.state.is_completed()],
                   run_seconds=[(r.end_time - r.start_time).total_seconds() for r in timed],
                   busy_seconds=busy.total_seconds() if busy else 0.0)

    def row(self) -> str:
        times = sorted(self.run_seconds) or [0.0]
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        per_minute = 60 * self.completed / self.busy_seconds if self.busy_seconds else 0.0
        return (f"| {self.kind} | {self.submitted} | {self.completed} | {len(self.failed)} | "
                f"{self.busy_seconds:.0f} | {per_minute:.1f} | "
                f"{statistics.median(times):.1f} | {p95:.1f} |")


@dataclass
class LoadReport:
    tag: str
    kinds: list[KindReport]
    wall_seconds: float
    problems: list[str]
    server_errors: int = 0  # API answers >= 500

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        total = sum(k.completed for k in self.kinds)
        return "\n".join([
            "| runs | submitted | completed | failed | busy s | runs/min | median run s | "
            "p95 run s |",
            "|---|---|---|---|---|---|---|---|",
            *(k.row() for k in self.kinds),
            f"\nall {total} runs in {self.wall_seconds:.0f} s wall "
            f"({60 * total / self.wall_seconds:.1f} runs/min), {self.server_errors} API "
            f"answer(s) 5xx; load tag {self.tag}",
            "checks: " + ("all passed" if self.ok else "; ".join(self.problems))])


def _competition_slices(path: str, count: int, rows: int) -> list[bytes]:
    """`count` distinct competition files of `rows` images from the file at `path`."""
    from model.data import read_competition_pickle

    ids, images = read_competition_pickle(path)
    if count * rows > len(ids):
        raise StackError(f"{path} holds {len(ids)} images; {count} scorings of {rows} "
                         f"distinct images need {count * rows}: pass a smaller --rows")
    parts = [slice(i * rows, (i + 1) * rows) for i in range(count)]
    return [pickle.dumps({b"data": images[p], b"ids": ids[p]}, protocol=4) for p in parts]


def _register_scoring_model(tag: str) -> str:
    """One version for all the scorings, so their outputs do not depend on which training
    finishes first. Returns its version number."""
    import mlflow

    from model.nets import build_model
    from tasks import registry
    from tasks.settings import Settings

    Settings.from_env().apply()
    with mlflow.start_run(run_name=f"loadtest {tag} scoring model"):
        mv = registry.register(build_model("light"), variant="light", tta=False,
                               tags={"recipe": "untrained", "loadtest": tag})
    return str(mv.version)


def _counting_5xx(errors: list[int], call, *args, **kwargs):
    """`call`, again after each 5xx the Prefect API answers, which `errors` records."""
    import httpx

    while True:
        try:
            return call(*args, **kwargs)
        except httpx.HTTPStatusError as e:
            if e.response.status_code < 500:
                raise
            errors.append(e.response.status_code)
            time.sleep(1)


def _wait(client, run_ids: Sequence, timeout: float, errors: list[int]) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    final: dict = {}
    while len(final) < len(run_ids):
        pending = [i for i in run_ids if i not in final]
        for start in range(0, len(pending), 200):
            runs = _counting_5xx(errors, client.read_flow_runs, flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=pending[start:start + 200])))
            final.update({r.id: r for r in runs if r.state is not None and r.state.is_final()})
        if len(final) < len(run_ids):
            if time.monotonic() > deadline:
                raise StackError(f"{len(run_ids) - len(final)} of {len(run_ids)} runs did "
                                 f"not finish within {timeout:.0f} s")
            time.sleep(2)
    return final


def run_load(trainings: int = 20, scorings: int = 50, *, competition_file: str,
             data_source: str | None = None, rows: int = 20, timeout: float = 3600,
             tag: str | None = None) -> LoadReport:
    """Submit the load through the Prefect API and MLflow of the stack this process's
    environment points at (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL_S3)."""
    import boto3
    import mlflow
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from model.profiles import PROFILES

    tag = tag or f"load-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3"))
    started = time.monotonic()

    inputs = _competition_slices(competition_file, scorings, rows) if scorings else []
    version = _register_scoring_model(tag) if scorings else None
    for i, body in enumerate(inputs):
        s3.put_object(Bucket=BUCKET, Key=f"loadtest/{tag}/inputs/{i:03d}.pkl", Body=body)

    smoke = PROFILES["smoke"]
    train_ids, score_ids, errors = [], [], []

    def submit(deployment: str, parameters: dict, name: str):
        return _counting_5xx(errors, run_deployment, deployment, parameters=parameters,
                             timeout=0, flow_run_name=name).id

    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
        for i in range(trainings):
            model = {"recipe": "fast", "variant": "light", "seed": i, **smoke.overrides_for("fast")}
            job = {"training": model, "run_key": f"{tag}-{i:03d}",
                   "data": {"data_source": data_source, "train_size": smoke.train_size,
                            "val_size": smoke.val_size}}
            train_ids.append(submit(TRAIN_DEPLOYMENT, {"job": job}, f"{tag}-train-{i:03d}"))
        for i in range(scorings):
            config = {"model_uri": f"models:/cifar10-resnet/{version}",
                      "input_uri": f"s3://{BUCKET}/loadtest/{tag}/inputs/{i:03d}.pkl",
                      "output": f"s3://{BUCKET}/loadtest/{tag}/predictions",
                      "tta": False, "device": "cpu"}
            score_ids.append(submit(SCORE_DEPLOYMENT, {"config": config}, f"{tag}-score-{i:03d}"))

        with get_client(sync_client=True) as client:
            final = _wait(client, train_ids + score_ids, timeout, errors)
    wall = time.monotonic() - started
    kinds = [KindReport.of("train-variant (smoke)", [final[i] for i in train_ids]),
             KindReport.of("score-competition", [final[i] for i in score_ids])]
    problems = [f"{k.kind} {failure}" for k in kinds for failure in k.failed]
    problems += _check_registry(s3, mlflow.MlflowClient(), tag, trainings)
    problems += _check_predictions(s3, tag, scorings, version)
    if errors:
        problems.append(f"the Prefect API answered {len(errors)} request(s) with "
                        f"{sorted(set(errors))}")
    return LoadReport(tag, kinds, wall, problems, len(errors))


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _check_registry(s3, mlflow_client, tag: str, trainings: int) -> list[str]:
    problems, results = [], {}
    for i in range(trainings):
        keys = [k for k in _keys(s3, f"objects/runs/{tag}-{i:03d}/")
                if k.endswith("/registered.json")]
        if len(keys) != 1:
            problems.append(f"run key {tag}-{i:03d} left {len(keys)} registered.json")
            continue
        results[i] = json.loads(s3.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read())
    versions = [r["version"] for r in results.values()]
    if len(set(versions)) != len(versions):
        problems.append(f"trainings share registry versions: {sorted(versions)}")
    for i, result in results.items():
        registered = mlflow_client.search_model_versions(f"run_id='{result['run_id']}'")
        if [v.version for v in registered] != [result["version"]]:
            problems.append(f"run key {tag}-{i:03d}: the registry holds versions "
                            f"{[v.version for v in registered]} for its run, expected "
                            f"[{result['version']}]")
    return problems


def _check_predictions(s3, tag: str, scorings: int, version: str | None) -> list[str]:
    keys = _keys(s3, f"loadtest/{tag}/predictions/")
    sets: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, name = key.rpartition("/")
        sets.setdefault(prefix, set()).add(name)
    problems = []
    if len(sets) != scorings:
        problems.append(f"{len(sets)} prediction sets in the bucket, expected {scorings}")
    for prefix, names in sets.items():
        if names != set(OUTPUT_FILES):
            problems.append(f"{prefix} holds {sorted(names)}, expected {list(OUTPUT_FILES)}")
            continue
        if f"/cifar10-resnet-v{version}/" not in f"/{prefix}/":
            problems.append(f"{prefix} is not from the scoring model version {version}")
        manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json")
                              ["Body"].read())
        body = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/predictions.csv")["Body"].read()
        rows = len(body.decode().strip().splitlines()) - 1
        if rows != manifest["rows"]:
            problems.append(f"{prefix}/predictions.csv has {rows} rows, manifest says "
                            f"{manifest['rows']}")
    return problems


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path(".stack"),
                        help="the stack's state directory (python -m infra.stack up --state-dir)")
    parser.add_argument("--trainings", type=int, default=20)
    parser.add_argument("--scorings", type=int, default=50)
    parser.add_argument("--rows", type=int, default=20, help="images per scoring input")
    parser.add_argument("--competition-file", default=environ.get("CIFAR_COMPETITION_FILE"),
                        help="scoring inputs are slices of it (default $CIFAR_COMPETITION_FILE)")
    parser.add_argument("--data-source", default=None,
                        help="training data (default: the workers' $CIFAR10_SOURCE)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for all runs")
    args = parser.parse_args(argv)
    if args.trainings < 0 or args.scorings < 0 or args.rows < 1:
        parser.error("--trainings and --scorings must be >= 0 and --rows >= 1")
    if args.scorings and not args.competition_file:
        parser.error("scoring needs --competition-file or $CIFAR_COMPETITION_FILE")
    try:
        env_file = args.state_dir / "stack" / "env"
        if not env_file.is_file():
            raise StackError(f"{env_file} does not exist: start the stack with "
                             "`python -m infra.stack up --state-dir DIR` first")
        os.environ.update(read_env_file(env_file))
        report = run_load(args.trainings, args.scorings, competition_file=args.competition_file,
                          data_source=args.data_source, rows=args.rows, timeout=args.timeout)
    except StackError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
