"""The GPU benchmark: every recipe x variant on one dataset, timed and scored in one run.

    python -m model.bench --data PATH [--test PATH] --recipes reference,paper,fast \
        --variants deep,light [--epochs N] [--workers N] [--seeds 0,1] --out results.json
    python -m model.bench --smoke            # a tiny CPU run, under a minute
    python -m model.bench --predict --data PATH --variants deep,light

It imports only model/ and what model/ imports, so it runs on a bare GPU machine that has
torch, torchvision, numpy, pyarrow and Pillow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from model.data import Dataset, Split, load_dataset
from model.nets import build_model, summary
from model.predict import (
    inference_model,
    labels_and_probabilities,
    logits,
    predict,
    resolve_device,
    synchronize,
    to_device_images,
)
from model.profiles import PROFILES
from model.train import TrainConfig, fit

H100_DENSE_BF16_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense (no sparsity)
TRAIN_FLOPS_PER_FORWARD = 3  # backward costs about twice the forward pass
PREDICT_SLICE = 1000  # images per turn when the old and new prediction paths alternate


@dataclass
class Row:
    recipe: str
    variant: str
    seed: int
    epochs: int
    train_seconds: float
    compile_seconds: float
    seconds_per_epoch: float
    images_per_second: float
    tflops: float
    peak_percent: float
    val_acc: float
    val_acc_tta: float | None
    test_acc: float | None
    compiled: bool = False  # the step ran compiled (a failed compile trains eager)


def run_training(args, data: Dataset, device: torch.device) -> list[Row]:
    rows = []
    for variant in args.variants:
        flops = summary(build_model(variant)).forward_flops * TRAIN_FLOPS_PER_FORWARD
        for recipe in args.recipes:
            for seed in args.seeds:
                overrides = config_overrides(args, recipe)
                if args.smoke:
                    overrides.setdefault("batch_size", 32)
                config = TrainConfig(
                    recipe=recipe, variant=variant, seed=seed, device=str(device),
                    workers=args.workers, compile=args.compile,
                    compile_mode=args.compile_mode, **overrides,
                )
                _log(f"training {recipe}/{variant} seed {seed}: {config.epochs} epochs, "
                     f"batch {config.batch_size}, {len(data.train):,} images")
                result = fit(config, data, on_epoch_end=_progress if args.verbose else None)
                m = result.metrics
                # The first epoch pays for cuDNN autotuning and allocator warm-up: report
                # the steady-state speed when there is more than one epoch.
                steady = result.history[1:] or result.history
                per_epoch = statistics.median(h["epoch_seconds"] for h in steady)
                ips = statistics.median(h["images_per_second"] for h in steady)
                tflops = flops * ips / 1e12
                rows.append(Row(
                    recipe, variant, seed, int(m["epochs"]), m["train_seconds"],
                    m["compile_seconds"], per_epoch, ips, tflops,
                    100 * tflops / H100_DENSE_BF16_TFLOPS, m["val/acc"], m.get("val/acc_tta"),
                    m.get("test/acc_tta", m.get("test/acc")), bool(m.get("compiled")),
                ))
    return rows


def config_overrides(args, recipe: str) -> dict:
    """TrainConfig fields for `recipe`: the profile's, then the options given."""
    overrides = PROFILES[args.profile].overrides_for(recipe) if args.profile else {}
    given = dict(epochs=args.epochs, batch_size=args.batch_size, cutout=args.cutout,
                 ema=args.ema)
    return {**overrides, **{k: v for k, v in given.items() if v is not None}}


def run_prediction(args, data: Dataset, device: torch.device) -> list[dict]:
    """Time `predict` against the path it replaced on up to 10,000 images, per variant and
    with and without TTA; model construction apart, `predict`'s own preparation (batch-norm
    folding) included. The two paths take turns every PREDICT_SLICE images, so that other
    work on a shared machine slows both alike and their ratio stays fair."""
    images = data.val.images
    if len(images) < args.predict_images:
        reps = -(-args.predict_images // len(images))
        images = np.concatenate([images] * reps)
    images = images[: args.predict_images]
    precision = "bf16" if device.type == "cuda" else "fp32"
    kwargs = dict(batch_size=args.predict_batch, device=device, precision=precision)
    out = []
    for variant in args.variants:
        model = build_model(variant).to(device).eval()
        synchronize(device)
        started = time.perf_counter()
        fast_model = inference_model(model, device)  # what predict() does first
        synchronize(device)
        prepare_seconds = time.perf_counter() - started
        paths = {"baseline": partial(baseline_predict, model, **kwargs),
                 "fast": partial(predict, fast_model, fuse=False, **kwargs)}
        for path in paths.values():  # warm-up: allocator, oneDNN/cuDNN primitives
            path(images[:256])
        for tta in (False, True):
            seconds = {"baseline": 0.0, "fast": prepare_seconds}
            results: dict[str, list] = {"baseline": [], "fast": []}
            for turn, start in enumerate(range(0, len(images), PREDICT_SLICE)):
                x = images[start : start + PREDICT_SLICE]
                for name in sorted(paths, reverse=turn % 2 == 1):
                    synchronize(device)
                    started = time.perf_counter()
                    results[name].append(paths[name](x, tta=tta))
                    synchronize(device)
                    seconds[name] += time.perf_counter() - started
            (base_labels, base_probs), (labels, probs) = (
                tuple(np.concatenate(part) for part in zip(*results[name], strict=True))
                for name in ("baseline", "fast"))
            base_s, fast_s = seconds["baseline"], seconds["fast"]
            out.append({
                "variant": variant, "tta": tta, "images": len(images),
                "baseline_seconds": base_s,
                "baseline_images_per_second": len(images) / base_s,
                "seconds": fast_s, "images_per_second": len(images) / fast_s,
                "speedup": base_s / fast_s,
                "max_prob_diff": float(np.abs(probs - base_probs).max(initial=0.0)),
                "labels_differ": int((labels != base_labels).sum()),
            })
            _log(f"predict {variant} tta={tta}: baseline {len(images) / base_s:,.0f} img/s, "
                 f"fast {len(images) / fast_s:,.0f} img/s")
    return out


def baseline_predict(model, images, *, batch_size: int, tta: bool = False, device,
                     precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """`predict` as it was before batch-norm folding, channels-last and small CPU batches:
    the unchanged eval model, NCHW, `batch_size` images per forward pass, one stream."""
    x = to_device_images(images, device)  # (N, 3, 32, 32) uint8
    y = logits(model.to(device), x, batch_size=batch_size, tta=tta, bf16=precision == "bf16")
    return labels_and_probabilities(y)


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
              f"{'compile s':>9} {'s/epoch':>8} {'img/s':>9} {'TFLOP/s':>8} {'% peak':>7} "
              f"{'val acc':>8} {'val TTA':>8} {'test acc':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.recipe:<10} {r.variant:<7} {r.seed:>4} {r.epochs:>6} {r.train_seconds:>8.1f} "
            f"{_compile_cell(r):>9} {r.seconds_per_epoch:>8.2f} {r.images_per_second:>9,.0f} "
            f"{r.tflops:>8.1f} {r.peak_percent:>6.1f}% {_pct(r.val_acc):>8} "
            f"{_pct(r.val_acc_tta):>8} {_pct(r.test_acc):>8}"
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
    return "failed" if r.compile_seconds > 0 else "eager"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _progress(metrics: dict) -> None:
    _log(f"  epoch {int(metrics['epoch'])}: train loss {metrics['train/loss']:.3f}, "
         f"val acc {100 * metrics['val/acc']:.2f}%, {metrics['epoch_seconds']:.2f} s")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic_dataset(n_train: int, n_val: int, seed: int = 0) -> Dataset:
    """Random images whose label is written into their mean colour, so a few steps can fit
    them: the smoke run needs no data on disk."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n).astype(np.int64)
        noise = rng.integers(0, 96, (n, 32, 32, 3))
        images = (noise + labels[:, None, None, None] * 16).astype(np.uint8)
        return Split(images, labels)

    return Dataset(train=split(n_train), val=split(n_val), test=None,
                   classes=tuple(str(i) for i in range(10)), digest="synthetic",
                   source="synthetic")


def _git_commit() -> str:
    try:
        # "-dirty" when tracked files differ from the commit: the numbers are not its own.
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                              capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--train-size", type=int, help="train on a stratified subset")
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
    p.add_argument("--smoke", action="store_true", help="tiny CPU run, under a minute")
    p.add_argument("--predict", action="store_true", help="time inference instead")
    p.add_argument("--predict-images", type=int, default=10_000)
    p.add_argument("--predict-batch", type=int, default=1000,
                   help="images per forward pass (predict caps it at 32 on the CPU)")
    p.add_argument("--cache-dir", help="decoded-array cache (default: CIFAR10_CACHE_DIR)")
    p.add_argument("--out", help="write the rows and the environment as JSON here")
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    args = p.parse_args(argv)
    args.recipes = [s for s in args.recipes.split(",") if s]
    args.variants = [s for s in args.variants.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.smoke:
        args.device = "cpu" if args.device == "auto" else args.device
        args.epochs = args.epochs or 1
        args.workers = 0
        args.val_size = min(args.val_size, 64)
        args.train_size = args.train_size or 64
        args.predict_images = min(args.predict_images, 64)
    elif not args.data:
        p.error("--data is required (or use --smoke)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.set_float32_matmul_precision("high")
    if args.data:
        data = load_dataset(args.data, val_size=args.val_size, train_size=args.train_size,
                            cache_dir=args.cache_dir)
    else:
        data = synthetic_dataset(args.train_size, args.val_size)
    if args.test:
        test = load_dataset(args.test, val_size=0, cache_dir=args.cache_dir)
        data = Dataset(data.train, data.val, test.test or test.train, data.classes,
                       data.digest, data.source)
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "load": "/".join(f"{x:.1f}" for x in os.getloadavg()),  # other work on this machine
        "commit": _git_commit(),
        "command": "python -m model.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_images": len(data.train),
        "val_images": len(data.val),
        "data_digest": data.digest,
    }
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
        result["rows"] = [r.__dict__ for r in rows]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
