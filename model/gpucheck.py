"""The GPU check: one command that measures every GPU target and says which are met.

    python -m model.bench --check [--data PATH] [--test PATH] [--out FILE]
    python -m model.bench --check best --variants deep,light [--best-seconds deep=200]
    python -m model.bench --check --smoke                # CPU, synthetic data: the plumbing

The default mode measures targets 1 (speed half), 2, 4 and 5 within 5 minutes; `best`
trains `fast` to each variant's time budget (target 3). Rows run in the order that measures
the most targets if time runs out; one predicted to end past the budget is skipped. The JSON
file is rewritten after every row; a SIGTERM leaves it `interrupted` with the finished rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from model import measure
from model.config import ConfigError
from model.errors import UserError

# The targets. Accuracies are on the validation split; time goals count training seconds
# only, with compilation and per-epoch evaluation reported beside them.
SPEEDUP_GOAL = 4.0  # 1: reference's seconds per epoch over paper's
FAST_GOALS = {"deep": (0.900, 20.0), "light": (0.896, 15.0)}  # 2: accuracy within seconds
BEST_GOALS = {"deep": 0.935, "light": 0.930}  # 3: flip-TTA accuracy ...
BEST_SECONDS = 300.0  # ... within this much training
PEAK_GOALS = {"deep": 25.0, "light": 22.0}  # 4: % of dense bf16 peak in a `fast` epoch
PREDICT_GOAL = (10_000, 1.0)  # 5: images predicted on the GPU, seconds
NOTES = [
    "target 1's accuracy half (paper within 0.7 points of reference after 75 epochs) "
    "takes 75 epochs of each recipe: not part of the check",
    "target 5's CPU half is measured by `python -m model.bench --predict` on a CPU",
]

# `fast`'s schedules for target 2: the whole schedule, not only the epoch reaching the
# accuracy, fits the time goal at the priors below. Unmeasured; --epochs overrides them.
FAST_EPOCHS = {"deep": 17, "light": 18}
# `fast`'s rows: the plan's, then options for targets 2 and 4, which take the best row.
FAST_ROWS = {"": {}, " eager": {"compile": False},
             " eager b1024": {"batch_size": 1024, "compile": False}, " b1024": {"batch_size": 1024}}
GRAPH_ROWS = {" reduce-overhead": {"compile_mode": "reduce-overhead"},
              " whole-step graph": {"cuda_graph": True}}
SPEED_EPOCHS = 3  # paper and reference: the first epoch warms up, the rest are timed
SMOKE_EPOCHS = 2  # so that a smoke row has a timed epoch after the warm-up one
# `best`: each variant's budget for the whole training run (compile and evaluation
# included), sized so that the default mode and both variants fit 12 minutes of commands.
BEST_BUDGETS = {"deep": 180.0, "light": 150.0}
SMOKE_BEST_SECONDS = 5.0
DEFAULT_SECONDS = 300.0  # the default mode's wall-time budget
DATA_SECONDS = 60.0  # `best`'s budget beyond its rows': decoding the data, the file
# The plan's priors until a measured row rescales them: seconds per epoch of 45,000 images on
# an H100, compiled where the recipe compiles (reference: earlier 16-worker runs; paper and
# fast: the efficiency goals), a cold compile, and per row its setup and final scoring.
PRIOR_EPOCH_SECONDS = {("reference", "deep"): 6.4, ("reference", "light"): 4.3,
                       ("paper", "deep"): 1.6, ("paper", "light"): 1.1,
                       ("fast", "deep"): 0.9, ("fast", "light"): 0.5}
PRIOR_IMAGES = 45_000
EAGER_SLOWDOWN = 1.5  # paper and fast without compile, per epoch: a guess
COMPILE_SECONDS = 45.0
ROW_SECONDS = 5.0
PREDICT_SECONDS = 15.0
# Where the training Parquet is looked for: a copy of the checkout has them only if carried.
DATA_PLACE = ".data/train.parquet"  # the checkout's ignored data folder, carried to the GPU
ROW_FIELDS = {f.name for f in dataclasses.fields(measure.Row)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GPU check (model/gpucheck.py)")
    g.add_argument("--check", nargs="?", const="default", choices=["default", "best"],
                   help="measure every GPU target: default (targets 1, 2, 4, 5; 5 min) or "
                   "best (target 3: fast trained to each variant's --best-seconds)")
    g.add_argument("--budget-seconds", type=float,
                   help="wall-time budget; rows predicted to end past it are skipped "
                   "(default: 300, best: the variants' budgets + 60; 0: no limit)")
    g.add_argument("--best-seconds", type=_variant_seconds, default={}, metavar="V=S,..",
                   help="best: each variant's budget for its whole training run (default "
                   + ",".join(f"{v}={s:g}" for v, s in BEST_BUDGETS.items()) + ")")


def _variant_seconds(text: str) -> dict[str, float]:
    pairs = [part.partition("=") for part in text.split(",")]
    with contextlib.suppress(ValueError):
        if {v for v, _, _ in pairs} <= set(BEST_BUDGETS) and min(float(s) for *_, s in pairs) > 0:
            return {v: float(s) for v, _, s in pairs}
    raise argparse.ArgumentTypeError(f"not deep=SECONDS,light=SECONDS above 0: {text!r}")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the check's defaults into `args`."""
    args.best_seconds = {v: SMOKE_BEST_SECONDS if args.smoke else s
                         for v, s in {**BEST_BUDGETS, **args.best_seconds}.items()}
    if args.check == "best":
        args.profile = args.profile or "full"
    if args.budget_seconds is None:
        args.budget_seconds = DEFAULT_SECONDS if args.check == "default" else (
            sum(args.best_seconds[v] + ROW_SECONDS for v in args.variants) + DATA_SECONDS)
    args.out = args.out or (f"results-check-{args.check}-{'-'.join(args.variants)}"
                            f"{'-smoke' if args.smoke else ''}.json")


def find_data(root: Path = Path()) -> str:
    """The configured source ($CIFAR10_SOURCE), else DATA_PLACE if it exists, else one
    `error:` line saying what to copy."""
    if os.environ.get("CIFAR10_SOURCE"):
        return os.environ["CIFAR10_SOURCE"]
    if (root / DATA_PLACE).is_file():
        return DATA_PLACE
    raise ConfigError(f"no training data: copy the training Parquet to {DATA_PLACE} and carry "
                      ".data (git ignores it), set CIFAR10_SOURCE, or pass --data PATH")


@dataclasses.dataclass
class Step:
    name: str  # e.g. "fast/light", "fast/light eager b1024", "predict"
    purpose: str  # the targets it measures
    run: Callable[[], list[dict]]
    seconds: Callable[[], float]  # predicted duration, from what was measured so far
    pair: Step | None = None  # a row worth running only with this one after it


def plan(args, data, device: torch.device, done: list[dict]) -> list[Step]:
    """The rows of `args.check`'s mode, in order; `done`: the rows measured so far."""
    seed, images = args.seeds[0], len(data.train) if data is not None else PRIOR_IMAGES

    def prior(recipe: str, variant: str, eager: bool) -> float:
        slow = EAGER_SLOWDOWN if eager and recipe != "reference" else 1.0
        return PRIOR_EPOCH_SECONDS[recipe, variant] * images / PRIOR_IMAGES * slow

    def predict(config) -> float:
        if config.time_budget_seconds:
            return config.time_budget_seconds + ROW_SECONDS
        rows = [r for r in done if r["kind"] == "train"]
        scale = statistics.median([(r["train_seconds"] + r["eval_seconds"]) / r["epochs"]
                                   / prior(r["recipe"], r["variant"], not r["compiled"])
                                   for r in rows] or [1.0])
        compiles = config.compiles_on(device)
        compile_ = max([r["compile_seconds"] for r in rows if r["compiled"]]
                       or [COMPILE_SECONDS]) if compiles else 0.0
        return ROW_SECONDS + compile_ + config.epochs * scale * prior(
            config.recipe, config.variant, not compiles)

    def train(recipe: str, variant: str, purpose: str, label: str = "", **row) -> Step:
        def config():
            return measure.train_config(args, recipe, variant, seed, device, **row)

        def run() -> list[dict]:
            goals = (FAST_GOALS[variant][0], BEST_GOALS[variant])
            r = measure.train_row(config(), data, device, goals, verbose=args.verbose)
            return [{"kind": "train", **dataclasses.asdict(r)}]
        return Step(f"{recipe}/{variant}{label}", purpose, run, lambda: predict(config()))

    smoke = SMOKE_EPOCHS if args.smoke else None
    if args.check == "best":
        return [train("fast", v, "3", time_budget_seconds=args.best_seconds[v])
                for v in args.variants]

    def predict_run() -> list[dict]:
        return [{"kind": "predict", **r} for r in measure.run_prediction(args, data, device)]

    steps = [Step("predict", "5", predict_run, lambda: PREDICT_SECONDS)]
    for v in sorted(args.variants):  # deep first: the report's headline network
        ref = train("reference", v, "1", epochs=smoke or SPEED_EPOCHS)
        steps += [dataclasses.replace(train("paper", v, "1", epochs=smoke or SPEED_EPOCHS),
                                      pair=ref), ref]
    # --epochs sets the accuracy rows' budget; the speed rows keep theirs.
    light_first = sorted(args.variants, key=lambda v: v != "light")  # light: the quicker
    steps += [train("fast", v, "2, 4", label, epochs=args.epochs or smoke or FAST_EPOCHS[v],
                    **o) for label, o in FAST_ROWS.items() for v in light_first]
    # CUDA graphs of paper's compiled forward and backward, then of its whole step (gather,
    # augmentation, forward, backward, Adam): target 1 takes the fastest paper.
    return steps + [train("paper", v, "1 (option)", label, epochs=smoke or SPEED_EPOCHS, **o)
                    for label, o in GRAPH_ROWS.items() for v in light_first]


def evaluate_targets(mode: str, rows: list[dict], variants: list[str]) -> list[dict]:
    """Each target of `mode` for each variant: measured, goal, met (None: unmeasured), and
    the rows it was measured on that ran with the compile fallback."""
    train = [r for r in rows if r["kind"] == "train"]
    named = {r["row"]: r for r in train}
    out = []

    def target(number, variant, what, measured, goal, compare, unit, met=None, used=(),
               **extra):
        if met is None and measured is not None:
            met = measured >= goal if compare == ">=" else measured <= goal
        fallback = [r["row"] for r in used if r is not None and r["compile_fallback"]]
        out.append({"target": number, "variant": variant, "what": what,
                    "measured": measured, "goal": goal, "compare": compare, "unit": unit,
                    "met": met, "fallback": fallback, **extra})

    for v in variants:
        fast = named.get(f"fast/{v}")
        if mode == "best":
            acc = fast and next(a for a in (fast["val_acc_tta"], fast["val_acc"]) if a is not None)
            met = None if fast is None else (acc >= BEST_GOALS[v]
                                             and fast["train_seconds"] <= BEST_SECONDS)
            target(3, v, f"validation accuracy with flip TTA, within {BEST_SECONDS:.0f} s "
                   "of training", acc, BEST_GOALS[v], ">=", "fraction", met, [fast],
                   train_seconds=None if fast is None else fast["train_seconds"])
            continue
        paper = min((r for r in train if r["recipe"] == "paper" and r["variant"] == v),
                    key=lambda r: r["seconds_per_epoch"], default=None)
        ref = named.get(f"reference/{v}")
        target(1, v, "paper's speed per epoch, times reference's (same run)",
               None if not (paper and ref)
               else ref["seconds_per_epoch"] / paper["seconds_per_epoch"],
               SPEEDUP_GOAL, ">=", "x", used=[paper, ref], row=paper and paper["row"])
        # Targets 2 and 4 take the best of `fast`'s rows: the plan's and its options.
        fasts = [r for r in train if r["recipe"] == "fast" and r["variant"] == v]
        acc, seconds = FAST_GOALS[v]
        reached = min(((t["train_seconds"], r) for r in fasts
                       if (t := r["time_to_accuracy"].get(f"{acc:.3f}"))),
                      key=lambda pair: pair[0], default=(None, None))
        target(2, v, f"training seconds until validation accuracy >= {acc:.1%}",
               reached[0], seconds, "<=", "s",
               None if not fasts else reached[0] is not None and reached[0] <= seconds,
               [reached[1]], row=reached[1] and reached[1]["row"])
        peak = max((r for r in fasts if r["peak_percent"] is not None),
                   key=lambda r: r["peak_percent"], default=None)
        target(4, v, "a fast epoch's share of the card's dense bf16 peak",
               peak and peak["peak_percent"], PEAK_GOALS[v], ">=", "%", used=[peak],
               row=peak and peak["row"])
        images, limit = PREDICT_GOAL
        timed = [r["seconds"] * images / r["images"] for r in rows
                 if r["kind"] == "predict" and r["variant"] == v]
        target(5, v, f"seconds to predict {images:,} images, the slower of with and "
               "without TTA", max(timed) if timed else None, limit, "<=", "s")
    return out


class Report:
    """The check's JSON file, rewritten whole after every change."""

    def __init__(self, path: str, mode: str, env: dict, variants: list[str]):
        self.path, self.mode, self.variants = path, mode, variants
        self.started = time.perf_counter()
        self.payload: dict = {"mode": mode, "status": "running", "elapsed_seconds": 0.0,
                              "env": env, "notes": NOTES, "plan": [], "rows": [],
                              "skipped": [], "targets": evaluate_targets(mode, [], variants)}
        self.write()

    def add(self, rows: list[dict]) -> None:
        self.payload["rows"] += rows
        self.payload["targets"] = evaluate_targets(self.mode, self.payload["rows"],
                                                   self.variants)
        self.write()

    def finish(self, status: str, **why) -> None:
        self.payload.update(status=status, **why)
        self.write()

    def write(self) -> None:
        self.payload["elapsed_seconds"] = time.perf_counter() - self.started
        measure.write_json(self.path, self.payload)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the rows, so the file says so


def run_check(args, device: torch.device, argv: list[str] | None) -> int:
    started = time.perf_counter()
    report = Report(args.out, args.check, measure.environment(None, device, argv),
                    args.variants)
    try:
        if not (args.smoke or args.data_source):
            args.data_source = find_data()
        data = measure.load_data(args)
    except UserError as exc:
        report.finish("failed", error=str(exc))
        raise
    report.payload["env"] = {**measure.environment(data, device, argv), "budget_seconds":
                             args.budget_seconds,
                             "data_seconds": time.perf_counter() - started}
    steps = plan(args, data, device, report.payload["rows"])
    report.payload["plan"] = [{"row": s.name, "purpose": s.purpose,
                               "predicted_seconds": round(s.seconds(), 1)} for s in steps]
    report.write()
    measure.note(format_plan(report.payload))
    failed, previous = False, signal.signal(signal.SIGTERM, _terminated)
    status = "interrupted"  # SIGTERM, Ctrl-C: the finished rows stay, the cut one is named
    try:
        for step in steps:
            left = args.budget_seconds - (time.perf_counter() - started)
            needed = step.seconds() + (step.pair.seconds() if step.pair else 0.0)
            if args.budget_seconds and needed > left:
                why = (f"predicted {needed:.0f} s{' with ' + step.pair.name if step.pair else ''}"
                       f", {left:.0f} s of the {args.budget_seconds:.0f} s budget left")
                measure.note(f"skipping {step.name}: {why}")
                report.payload["skipped"].append({"row": step.name, "purpose": step.purpose,
                                                  "why": why})
                report.write()
                continue
            report.payload["current"] = step.name
            row_started = time.perf_counter()
            try:
                rows = step.run()
            except Exception as exc:  # one broken row must not cost the others
                traceback.print_exc()
                failed = True
                rows = [{"kind": "error", "error": f"{type(exc).__name__}: {exc}"}]
            for row in rows:
                row.update(row=step.name, purpose=step.purpose,
                           wall_seconds=time.perf_counter() - row_started)
            report.add(rows)
        report.payload.pop("current", None)
        status = "failed" if failed else "finished"
    finally:
        signal.signal(signal.SIGTERM, previous)
        report.finish(status)
        print(format_summary(report.payload))
    return 1 if failed else 0


def format_plan(payload: dict) -> str:
    total = sum(p["predicted_seconds"] for p in payload["plan"])
    env = payload["env"]
    lines = [f"plan: {total:.0f} s of rows predicted, budget {env['budget_seconds']:.0f} s "
             f"({env['data_seconds']:.0f} s spent loading data); rows that would end past "
             "it are skipped"]
    lines += [f"  {p['row']:<28} target {p['purpose']:<14} ~{p['predicted_seconds']:.0f} s"
              for p in payload["plan"]]
    if env["commit"] == "unknown":
        lines.append("commit unknown: carry a COMMIT file (git describe --always --dirty)")
    return "\n".join(lines)


def format_summary(payload: dict) -> str:
    rows = payload["rows"]
    train = [measure.Row(**{k: v for k, v in r.items() if k in ROW_FIELDS})
             for r in rows if r["kind"] == "train"]
    predicted = [r for r in rows if r["kind"] == "predict"]
    lines = [measure.format_table(train)] if train else []
    lines += [measure.format_predict_table(predicted)] if predicted else []
    lines += [f"{r['row']} failed: {r['error']}" for r in rows if r["kind"] == "error"]
    lines += [f"skipped {s['row']} (target {s['purpose']}): {s['why']}"
              for s in payload["skipped"]]
    for t in payload["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        measured = "-" if t["measured"] is None else f"{t['measured']:.4g}"
        lines.append(f"target {t['target']} {t['variant']:<5} {verdict:<12} {measured} "
                     f"{t['compare']} {t['goal']:g} {t['unit']}: {t['what']}"
                     + (f" (row {t['row']})" if t.get("row") else ""))
        if t["fallback"]:
            lines.append(f"  measured with a fallback: {', '.join(t['fallback'])} ran the "
                         "plain step after its compile or CUDA-graph capture failed")
    env = payload["env"]
    lines.append(f"{payload['status']} in {payload['elapsed_seconds']:.0f} s"
                 + (f" (cut during {payload['current']})" if payload.get("current") else "")
                 + f"; commit {env['commit']}; torch {env['torch']}, CUDA {env['cuda']}, "
                 f"Triton {env['triton']}")
    return "\n".join(lines)
