"""The GPU check: one command that measures every GPU target and says which are met.

    python -m model.bench --check [--data .data/train.parquet] [--test PATH] [--out FILE]
    python -m model.bench --check best --variants deep   # target 3, one variant per call
    python -m model.bench --check --smoke                # CPU, synthetic data: the plumbing

The default mode measures targets 1 (its speed half), 2, 4 and 5 in at most 5 minutes on
one H100 or H200, data decoding and compiles included; `best` measures target 3 for one
variant in at most 6 minutes. Rows run most telling first; a row that would begin with
less than ROW_RESERVE seconds of the mode's budget left is skipped and listed as such.

The JSON file (--out) is rewritten atomically after every row, so a run cut off still
leaves every finished row. Per row: training, evaluation and compile seconds, seconds per
epoch, images/s, TFLOP/s and % of the card's dense bf16 peak, validation and --test
accuracy with and without TTA, time to each accuracy goal, recompiles and CUDA-graph
skips. Per target: measured, goal, met (null while unmeasured).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
from collections.abc import Callable

import torch

from model import measure

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

# `fast`'s budgets, sized to the time goals at the efficiency goals: an epoch of 45,000
# images takes ~0.9 s (deep at 25% of 989 TFLOP/s) and ~0.5 s (light at 22%).
# Unmeasured on a GPU: --epochs overrides them.
FAST_EPOCHS = {"deep": 20, "light": 28}
SPEED_EPOCHS = 3  # paper and reference: the first epoch warms up, the rest are timed
SMOKE_EPOCHS = 2  # so that a smoke row has a timed epoch after the warm-up one
MODE_SECONDS = {"default": 300.0, "best": 360.0}  # each mode's wall-time budget
ROW_RESERVE = 45.0  # seconds: about one compile; less than this left, no new row begins
DEFAULT_OUT = "results-check.json"
DEFAULT_DATA = ".data/train.parquet"  # where the GPU machine's copy keeps the Parquet
ROW_FIELDS = {f.name for f in dataclasses.fields(measure.Row)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GPU check (model/gpucheck.py)")
    g.add_argument("--check", nargs="?", const="default", choices=["default", "best"],
                   help="measure every GPU target: default (targets 1, 2, 4, 5; 5 min) or "
                   "best (target 3, one variant; 6 min)")
    g.add_argument("--budget-seconds", type=float,
                   help="wall-time budget; rows that would begin past it are skipped "
                   "(default: 300 for the default mode, 360 for best; 0: no limit)")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the check's defaults into `args`; one-line errors for what cannot run."""
    if args.check == "best" and len(args.variants) != 1:
        p.error("--check best trains one variant per call (up to 6 minutes each): pass "
                "--variants deep or --variants light")
    if not args.smoke:
        args.data_source = args.data_source or DEFAULT_DATA
    if args.check == "best":
        args.profile = args.profile or "full"
    if args.budget_seconds is None:
        args.budget_seconds = MODE_SECONDS[args.check]
    args.out = args.out or DEFAULT_OUT


@dataclasses.dataclass
class Step:
    name: str  # e.g. "fast/light", "predict"
    purpose: str  # the targets it measures
    run: Callable[[], list[dict]]


def plan(args, data, device: torch.device) -> list[Step]:
    """The rows of `args.check`'s mode, most telling first."""
    seed = args.seeds[0]

    def train(recipe: str, variant: str, epochs: int | None) -> Callable[[], list[dict]]:
        def run() -> list[dict]:
            # The options, then the plan's epochs (none: the profile's or the recipe's).
            config = measure.train_config(args, recipe, variant, seed, device, epochs)
            goals = (FAST_GOALS[variant][0], BEST_GOALS[variant])
            row = measure.train_row(config, data, device, goals, verbose=args.verbose)
            return [{"kind": "train", **dataclasses.asdict(row)}]
        return run

    def predict() -> list[dict]:
        return [{"kind": "predict", **r} for r in measure.run_prediction(args, data, device)]

    # --epochs sets the accuracy rows' budget; the speed rows keep theirs.
    smoke = SMOKE_EPOCHS if args.smoke else None
    variants = args.variants
    if args.check == "best":
        (v,) = variants
        return [Step(f"fast/{v}", "3", train("fast", v, args.epochs or smoke))]
    steps = [Step(f"fast/{v}", "2, 4", train("fast", v, args.epochs or smoke or FAST_EPOCHS[v]))
             for v in sorted(variants, key=lambda v: v != "light")]  # light: the quicker
    steps.append(Step("predict", "5", predict))
    for v in sorted(variants):  # deep first: the report's headline network
        steps += [Step(f"{recipe}/{v}", "1", train(recipe, v, smoke or SPEED_EPOCHS))
                  for recipe in ("paper", "reference")]
    return steps


def evaluate_targets(mode: str, rows: list[dict], variants: list[str]) -> list[dict]:
    """Each target of `mode` for each variant: measured, goal and met (None: unmeasured)."""
    train = {(r["recipe"], r["variant"]): r for r in rows if r["kind"] == "train"}
    out = []

    def target(number, variant, what, measured, goal, compare, unit, met=None, **extra):
        if met is None and measured is not None:
            met = measured >= goal if compare == ">=" else measured <= goal
        out.append({"target": number, "variant": variant, "what": what,
                    "measured": measured, "goal": goal, "compare": compare, "unit": unit,
                    "met": met, **extra})

    for v in variants:
        fast = train.get(("fast", v))
        if mode == "best":
            acc = None if fast is None else _first(fast["val_acc_tta"], fast["val_acc"])
            met = None if fast is None else (acc >= BEST_GOALS[v]
                                             and fast["train_seconds"] <= BEST_SECONDS)
            target(3, v, f"validation accuracy with flip TTA, within {BEST_SECONDS:.0f} s "
                   "of training", acc, BEST_GOALS[v], ">=", "fraction", met,
                   train_seconds=None if fast is None else fast["train_seconds"])
            continue
        paper, ref = train.get(("paper", v)), train.get(("reference", v))
        target(1, v, "paper's speed per epoch, times reference's (same run)",
               None if not (paper and ref)
               else ref["seconds_per_epoch"] / paper["seconds_per_epoch"],
               SPEEDUP_GOAL, ">=", "x")
        acc, seconds = FAST_GOALS[v]
        reached = None if fast is None else fast["time_to_accuracy"].get(f"{acc:.3f}")
        target(2, v, f"training seconds until validation accuracy >= {acc:.1%}",
               reached and reached["train_seconds"], seconds, "<=", "s",
               None if fast is None else (reached is not None
                                          and reached["train_seconds"] <= seconds))
        target(4, v, "a fast epoch's share of the card's dense bf16 peak",
               None if fast is None else fast["peak_percent"], PEAK_GOALS[v], ">=", "%")
        images, limit = PREDICT_GOAL
        timed = [r["seconds"] * images / r["images"] for r in rows
                 if r["kind"] == "predict" and r["variant"] == v]
        target(5, v, f"seconds to predict {images:,} images, the slower of with and "
               "without TTA", max(timed) if timed else None, limit, "<=", "s")
    return out


def _first(*values):
    return next((v for v in values if v is not None), None)


class Report:
    """The check's JSON file, rewritten whole after every change."""

    def __init__(self, path: str, mode: str, env: dict, variants: list[str]):
        self.path, self.mode, self.variants = path, mode, variants
        self.started = time.perf_counter()
        self.payload: dict = {"mode": mode, "status": "running", "elapsed_seconds": 0.0,
                              "env": env, "notes": NOTES, "rows": [], "skipped": [],
                              "targets": evaluate_targets(mode, [], variants)}
        self.write()

    def add(self, rows: list[dict]) -> None:
        self.payload["rows"] += rows
        self.payload["targets"] = evaluate_targets(self.mode, self.payload["rows"],
                                                   self.variants)
        self.write()

    def skip(self, step: Step, why: str) -> None:
        self.payload["skipped"].append({"row": step.name, "purpose": step.purpose, "why": why})
        self.write()

    def finish(self, status: str) -> None:
        self.payload["status"] = status
        self.write()

    def write(self) -> None:
        self.payload["elapsed_seconds"] = time.perf_counter() - self.started
        measure.write_json(self.path, self.payload)


def run_check(args, device: torch.device, argv: list[str] | None) -> int:
    started = time.perf_counter()
    data = measure.load_data(args)
    env = measure.environment(data, device, argv)
    env["data_seconds"] = time.perf_counter() - started  # decode, split, transfer
    env["budget_seconds"] = args.budget_seconds
    report = Report(args.out, args.check, env, args.variants)
    failed = False
    try:
        for step in plan(args, data, device):
            left = args.budget_seconds - (time.perf_counter() - started)
            if args.budget_seconds and left < ROW_RESERVE:
                measure.note(f"skipping {step.name}: {left:.0f} s of the budget left")
                report.skip(step, f"{left:.0f} s of the {args.budget_seconds:.0f} s budget left")
                continue
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
    except BaseException:
        report.finish("interrupted")
        raise
    report.finish("failed" if failed else "finished")
    print(format_summary(report.payload))
    return 1 if failed else 0


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
                     f"{t['compare']} {t['goal']:g} {t['unit']}: {t['what']}")
    lines.append(f"{payload['status']} in {payload['elapsed_seconds']:.0f} s; "
                 f"commit {payload['env']['commit']}")
    return "\n".join(lines)


