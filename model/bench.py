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
import sys
from statistics import mean, stdev
from typing import get_args

import torch

from model import gpucheck, measure
from model.config import DataConfig, Recipe, TrainConfig, Variant, add_options, option_specs
from model.errors import UserError
from model.measure import Row, run_prediction, train_config, train_row
from model.predict import resolve_device
from model.profiles import PROFILES

SMOKE_IMAGES = 4  # training and validation images of a smoke run: plumbing, not learning
WORKERS = 16  # reference DataLoader workers: a GPU machine's cores, not this one's
ROWS = [("recipes", list[Recipe], list(get_args(Recipe)), "recipes to train"),
        ("variants", list[Variant], list(get_args(Variant)), "networks to train"),
        ("seeds", list[int], [0], "training seeds, one row each")]


def _groups(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """The rows by (recipe, variant), in the order they ran."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.recipe, r.variant), []).append(r)
    return groups


def format_ratios(rows: list[Row]) -> str:
    """Seconds per epoch of `reference` over each recipe's, per variant, from this run."""
    per_epoch = {key: mean(r.seconds_per_epoch for r in group)
                 for key, group in _groups(rows).items()}
    lines = []
    for recipe, variant in sorted(per_epoch, key=lambda key: key[::-1]):
        ref = per_epoch.get(("reference", variant))
        if recipe != "reference" and ref is not None:
            mine = per_epoch[recipe, variant]
            lines.append(f"{recipe}/{variant}: {ref / mine:.1f}x faster per epoch than "
                         f"reference/{variant} ({mine:.2f} s vs {ref:.2f} s)")
    return "\n".join(lines)


def format_seed_means(rows: list[Row]) -> str:
    """Validation accuracy (flip TTA where scored) as mean ± std over seeds, per row kind."""
    lines = []
    for (recipe, variant), group in _groups(rows).items():
        if len(group) > 1:
            accs = [r.val_acc if r.val_acc_tta is None else r.val_acc_tta for r in group]
            lines.append(f"{recipe}/{variant} over {len(group)} seeds: {100 * mean(accs):.2f}"
                         f" ± {100 * stdev(accs):.2f} %")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.split("\n")[0])
    # Every training and data option, from the config's fields; each applies to all rows.
    specs = option_specs(TrainConfig, DataConfig, skip=("recipe", "variant", "seed"))
    add_options(p, ROWS + [(n, t, WORKERS if n == "workers" else d, h) for n, t, d, h in specs],
                aliases={"data_source": "--data"})
    p.set_defaults(**{name: default for name, _, default, _ in ROWS}, workers=WORKERS,
                   device="auto")
    p.add_argument("--test", help="a labelled source whose test split (or whole) is scored")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="train with a profile's settings (full: fast's best-accuracy budget); "
                   "the options given override them")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run, seconds")
    p.add_argument("--predict", action="store_true", help="time inference instead")
    p.add_argument("--predict-images", type=int, default=10_000)
    p.add_argument("--predict-batch", type=int, default=1000,
                   help="images per forward pass (predict caps it at 32 on the CPU)")
    p.add_argument("--cache-dir", help="decoded-array cache (default: CIFAR10_CACHE_DIR)")
    p.add_argument("--out", help="write the rows and the environment as JSON here")
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    gpucheck.add_arguments(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        args.epochs = args.epochs or (None if args.check else 1)
        args.workers = 0
        args.val_size = min(args.val_size or SMOKE_IMAGES, SMOKE_IMAGES)
        args.train_size = args.train_size or SMOKE_IMAGES
        args.predict_images = min(args.predict_images, SMOKE_IMAGES)
    if args.check:
        gpucheck.check_args(p, args)
    elif not (args.data_source or args.smoke):
        p.error("--data is required (or use --smoke)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.set_float32_matmul_precision("high")
    if args.check:
        try:
            return gpucheck.run_check(args, device, argv)
        except UserError as exc:  # the file already says so; one line here
            print(f"error: {exc}", file=sys.stderr)
            return 2
    data = measure.load_data(args)
    env = measure.environment(data, device, argv)
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    result: dict = {"env": env}
    if args.predict:
        pred = run_prediction(args, data, device)
        print(measure.format_predict_table(pred))
        result["predict"] = pred
    else:
        rows = [train_row(train_config(args, recipe, variant, seed, device), data, device,
                          verbose=args.verbose)
                for variant in args.variants for recipe in args.recipes for seed in args.seeds]
        print(measure.format_table(rows))
        for text in (format_ratios(rows), format_seed_means(rows)):
            if text:
                print(text)
        result["rows"] = [dataclasses.asdict(r) for r in rows]
    if args.out:
        measure.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
