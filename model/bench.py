"""The GPU benchmark: every recipe x variant on one dataset, timed and scored in one run.

    python -m model.bench --data PATH [--test PATH] --recipes reference,paper,fast \
        --variants deep,light [--epochs N] [--workers N] [--seeds 0,1] --out results.json
    python -m model.bench --smoke            # a tiny CPU run, seconds
    python -m model.bench --predict --data PATH --variants deep,light
    python -m model.bench --check [best]     # every GPU target, measured (model/gpucheck.py)

It imports only model/ and what model/ imports, so it runs on a bare GPU machine that has
torch, torchvision, numpy, pyarrow and Pillow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time

import torch

from model.config import DataConfig
from model.data import Dataset, load_dataset
from model.fileio import atomic_write
from model.measure import (  # noqa: F401 (baseline_predict, synthetic_dataset re-exported)
    Row,
    baseline_predict,
    card_peak,
    run_prediction,
    synthetic_dataset,
    train_row,
)
from model.predict import resolve_device
from model.profiles import PROFILES
from model.provenance import code_commit
from model.train import TrainConfig

SMOKE_IMAGES = 4  # training and validation images of a smoke run: plumbing, not learning
SMOKE_BATCH = 4  # one step per smoke epoch


def run_training(args, data: Dataset, device: torch.device) -> list[Row]:
    rows = []
    for variant in args.variants:
        for recipe in args.recipes:
            for seed in args.seeds:
                config = TrainConfig(
                    recipe=recipe, variant=variant, seed=seed, device=str(device),
                    workers=args.workers, compile=args.compile,
                    compile_mode=args.compile_mode, **config_overrides(args, recipe),
                )
                rows.append(train_row(config, data, device, verbose=args.verbose))
    return rows


def config_overrides(args, recipe: str) -> dict:
    """TrainConfig fields for `recipe`: the profile's, then the options given."""
    overrides = PROFILES[args.profile].overrides_for(recipe) if args.profile else {}
    given = dict(epochs=args.epochs, batch_size=args.batch_size, cutout=args.cutout,
                 ema=args.ema)
    if args.smoke:
        overrides.setdefault("batch_size", SMOKE_BATCH)
    return {**overrides, **{k: v for k, v in given.items() if v is not None}}


def format_predict_table(rows: list[dict]) -> str:
    """One line per variant and TTA setting: the old path, the new one and their ratio."""
    header = (f"{'predict':<8} {'tta':<5} {'images':>7} {'baseline img/s':>14} "
              f"{'fast img/s':>10} {'speedup':>7} {'max |dp|':>9} {'labels differ':>13}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['variant']:<8} {r['tta']!s:<5} {r['images']:>7,} "
            f"{r['baseline_images_per_second']:>14,.0f} {r['images_per_second']:>10,.0f} "
            f"{r['speedup']:>6.2f}x {r['max_prob_diff']:>9.1e} {r['labels_differ']:>13,}"
        )
    return "\n".join(lines)


def format_table(rows: list[Row]) -> str:
    header = (f"{'recipe':<10} {'variant':<7} {'seed':>4} {'epochs':>6} {'train s':>8} "
              f"{'eval s':>6} {'compile s':>9} {'s/epoch':>8} {'img/s':>9} {'TFLOP/s':>8} "
              f"{'% peak':>7} {'val acc':>8} {'val TTA':>8} {'test acc':>8} {'test TTA':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = "-" if r.peak_percent is None else f"{r.peak_percent:.1f}%"
        lines.append(
            f"{r.recipe:<10} {r.variant:<7} {r.seed:>4} {r.epochs:>6} {r.train_seconds:>8.1f} "
            f"{r.eval_seconds:>6.1f} {_compile_cell(r):>9} {r.seconds_per_epoch:>8.2f} "
            f"{r.images_per_second:>9,.0f} {r.tflops:>8.1f} {peak:>7} {_pct(r.val_acc):>8} "
            f"{_pct(r.val_acc_tta):>8} {_pct(r.test_acc):>8} {_pct(r.test_acc_tta):>8}"
        )
    return "\n".join(lines)


def format_ratios(rows: list[Row]) -> str:
    """Seconds per epoch of `reference` over each recipe's, per variant, from this run."""
    lines = []
    for variant in sorted({r.variant for r in rows}):
        base = [r.seconds_per_epoch for r in rows if r.variant == variant
                and r.recipe == "reference"]
        if not base:
            continue
        ref = statistics.mean(base)
        for recipe in sorted({r.recipe for r in rows if r.variant == variant}):
            if recipe == "reference":
                continue
            mine = statistics.mean(r.seconds_per_epoch for r in rows
                                   if r.variant == variant and r.recipe == recipe)
            lines.append(f"{recipe}/{variant}: {ref / mine:.1f}x faster per epoch than "
                         f"reference/{variant} ({mine:.2f} s vs {ref:.2f} s)")
    return "\n".join(lines)


def format_seed_means(rows: list[Row]) -> str:
    lines = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.recipe, r.variant), []).append(r)
    for (recipe, variant), group in groups.items():
        if len(group) < 2:
            continue
        accs = [r.val_acc_tta if r.val_acc_tta is not None else r.val_acc for r in group]
        lines.append(f"{recipe}/{variant} over {len(group)} seeds: "
                     f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f} %")
    return "\n".join(lines)


def _compile_cell(r: Row) -> str:
    """Compile seconds; `eager` when the step was not compiled, `failed` when compiling was
    tried and fell back to eager (the log says why)."""
    if r.compiled:
        return f"{r.compile_seconds:.1f}"
    return "failed" if r.compile_fallback else "eager"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.split("\n")[0])
    p.add_argument("--data", help="training source: parquet, cifar-10-python folder/tar.gz, "
                   "torchvision, file:// or s3:// URI")
    p.add_argument("--test", help="a labelled source whose test split (or whole) is scored")
    p.add_argument("--recipes", default="reference,paper,fast")
    p.add_argument("--variants", default="deep,light")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, help="override every recipe's epochs")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, default=16, help="reference DataLoader workers")
    p.add_argument("--val-size", type=int, default=5000, help="images held out for validation")
    p.add_argument("--train-size", type=int, help="train on a stratified subset")
    p.add_argument("--split-seed", type=int, default=0, help="seeds the hold-out and subset")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training step (default: on for paper and fast on CUDA)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="reduce-overhead replays each step as CUDA graphs")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="train with a profile's settings (full: fast's best-accuracy budget); "
                   "the options below override them")
    p.add_argument("--cutout", type=int, help="cutout square side, pixels (fast)")
    p.add_argument("--ema", type=float, help="weight EMA decay per step, e.g. 0.999")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run, seconds")
    p.add_argument("--predict", action="store_true", help="time inference instead")
    p.add_argument("--predict-images", type=int, default=10_000)
    p.add_argument("--predict-batch", type=int, default=1000,
                   help="images per forward pass (predict caps it at 32 on the CPU)")
    p.add_argument("--cache-dir", help="decoded-array cache (default: CIFAR10_CACHE_DIR)")
    p.add_argument("--out", help="write the rows and the environment as JSON here")
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    from model import gpucheck  # the check reuses this module's rows: imported late

    gpucheck.add_arguments(p)
    args = p.parse_args(argv)
    args.recipes = [s for s in args.recipes.split(",") if s]
    args.variants = [s for s in args.variants.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        args.epochs = args.epochs or (None if args.check else 1)
        args.workers = 0
        args.val_size = min(args.val_size, SMOKE_IMAGES)
        args.train_size = args.train_size or SMOKE_IMAGES
        args.predict_images = min(args.predict_images, SMOKE_IMAGES)
    if args.check:
        gpucheck.check_args(p, args)
    elif not (args.data or args.smoke):
        p.error("--data is required (or use --smoke)")
    return args


def load_data(args) -> Dataset:
    """The training source (synthetic for --smoke), with --test's images as the test split."""
    if args.data:
        data = DataConfig(data_source=args.data, val_size=args.val_size,
                          train_size=args.train_size, split_seed=args.split_seed,
                          ).load(cache_dir=args.cache_dir)
    else:
        data = synthetic_dataset(args.train_size, args.val_size)
    if args.test:
        test = load_dataset(args.test, val_size=0, cache_dir=args.cache_dir)
        data = Dataset(data.train, data.val, test.test or test.train, data.classes,
                       data.digest, data.source)
    return data


def environment(data: Dataset, device: torch.device, argv: list[str] | None) -> dict:
    """What ran where: the card and its peak, versions, the commit and the exact command."""
    name, peak = card_peak(device)
    command = sys.orig_argv if argv is None else ["python", "-m", "model.bench", *argv]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": name,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "load": "/".join(f"{x:.1f}" for x in os.getloadavg()),  # other work on this machine
        "commit": code_commit(),
        "command": shlex.join(command),
        "train_images": len(data.train),
        "val_images": len(data.val),
        "test_images": len(data.test) if data.test is not None else 0,
        "data_digest": data.digest,
    }


def write_json(path: str, payload: dict) -> None:
    """Readers (and a run cut off mid-write) see the old file or the new one, whole."""
    with atomic_write(path, text=True) as f:
        json.dump(payload, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.set_float32_matmul_precision("high")
    if args.check:
        from model import gpucheck

        return gpucheck.run_check(args, device, argv)
    data = load_data(args)
    env = environment(data, device, argv)
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    result: dict = {"env": env}
    if args.predict:
        pred = run_prediction(args, data, device)
        print(format_predict_table(pred))
        result["predict"] = pred
    else:
        rows = run_training(args, data, device)
        print(format_table(rows))
        for text in (format_ratios(rows), format_seed_means(rows)):
            if text:
                print(text)
        result["rows"] = [dataclasses.asdict(r) for r in rows]
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
