"""Measurements shared by the benchmark and the GPU check: one training row, the card's
peak, torch's compile events, prediction timing, a synthetic dataset for smoke runs, and
the data, environment, tables and JSON file of a run."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch

from model.config import DataConfig, TrainConfig, given
from model.data import Dataset, Split, load_dataset
from model.fileio import atomic_write
from model.nets import build_model, summary
from model.predict import (
    inference_model,
    labels_and_probabilities,
    logits,
    predict,
    synchronize,
    to_device_images,
)
from model.profiles import PROFILES
from model.provenance import code_commit
from model.train import fit

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by the name
# torch reports for the card; the first pattern found in the name wins. Unknown: no peak.
DENSE_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
                     ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
TRAIN_FLOPS_PER_FORWARD = 3  # backward costs about twice the forward pass
PREDICT_SLICE = 1000  # images per turn when the old and new prediction paths alternate
SMOKE_BATCH = 4  # one step per smoke epoch
DATA_OPTIONS = tuple(DataConfig.__dataclass_fields__)
# The TrainConfig options a benchmark takes once for all its rows; rows vary the others.
TRAIN_OPTIONS = tuple(f for f in TrainConfig.__dataclass_fields__
                      if f not in ("recipe", "variant", "seed"))


@dataclass
class Row:
    recipe: str
    variant: str
    seed: int
    epochs: int
    train_seconds: float  # training only: compile and evaluation are timed apart
    compile_seconds: float
    seconds_per_epoch: float  # training seconds, median of the epochs after the first
    images_per_second: float  # training images per training second, same epochs
    tflops: float
    peak_percent: float | None  # of the card's dense bf16 peak; None: CPU or unknown card
    val_acc: float
    val_acc_tta: float | None
    test_acc: float | None
    test_acc_tta: float | None = None
    compiled: bool = False  # the step ran compiled
    compile_fallback: bool = False  # compiling was tried and failed: the step ran eager
    eval_seconds: float = 0.0  # per-epoch validation, summed
    recompiles: int = 0  # graphs dynamo compiled after the warm-up, in the timed training
    cudagraph_skips: int = 0  # graphs inductor did not capture as CUDA graphs
    # Accuracy goal -> {"epochs", "train_seconds"} when validation first reached it, or None.
    time_to_accuracy: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    batch_size: int = 0


def train_config(args, recipe: str, variant: str, seed: int, device: torch.device,
                 **row) -> TrainConfig:
    """One row's config: the profile's settings for `recipe` (a smoke run's batch below
    them), then the options given, then the row's own settings (a plan's) that are set."""
    profile = PROFILES[args.profile].overrides_for(recipe) if args.profile else {}
    return TrainConfig(**{
        **({"batch_size": SMOKE_BATCH} if args.smoke else {}), **profile,
        **given(args, TRAIN_OPTIONS), "recipe": recipe, "variant": variant, "seed": seed,
        "device": str(device), **{k: v for k, v in row.items() if v is not None}})


def train_row(config: TrainConfig, data: Dataset, device: torch.device,
              accuracy_goals: tuple[float, ...] = (), verbose: bool = False) -> Row:
    """Train `config` and measure it: one row of the benchmark and of the GPU check."""
    epochs = (f"a {config.time_budget_seconds:g} s budget" if config.time_budget_seconds
              else f"{config.epochs} epochs")
    note(f"training {config.recipe}/{config.variant} seed {config.seed}: {epochs}, batch "
         f"{config.batch_size}, {len(data.train):,} images")
    flops = summary(build_model(config.variant)).forward_flops * TRAIN_FLOPS_PER_FORWARD
    peak = card_peak(device)[1]
    result = fit(config, data, on_epoch_end=_progress if verbose else None)
    m, history = result.metrics, result.history
    # The first epoch pays for cuDNN autotuning and allocator warm-up: report the
    # steady-state speed when there is more than one epoch.
    steady = history[1:] or history
    per_epoch = statistics.median(h["train_seconds"] for h in steady)
    ips = statistics.median(h["images_per_second"] for h in steady)
    tflops = flops * ips / 1e12
    return Row(
        config.recipe, config.variant, config.seed, int(m["epochs"]), m["train_seconds"],
        m["compile_seconds"], per_epoch, ips, tflops,
        None if peak is None else 100 * tflops / peak, m["val/acc"], m.get("val/acc_tta"),
        m.get("test/acc"), m.get("test/acc_tta"), bool(m.get("compiled")),
        bool(m.get("compile_fallback")), m["eval_seconds"], int(m.get("recompiles", 0)),
        int(m.get("cudagraph_skips", 0)), time_to_accuracy(history, accuracy_goals), history,
        config.batch_size)


def time_to_accuracy(history: list[dict], goals: tuple[float, ...]) -> dict:
    """For each accuracy goal, the epochs and training seconds until the validation
    accuracy first reached it (None: never)."""
    out: dict[str, dict | None] = {}
    for goal in goals:
        n = next((n for n, h in enumerate(history, start=1) if h["val/acc"] >= goal), None)
        seconds = sum(h["train_seconds"] for h in history[:n])
        out[f"{goal:.3f}"] = None if n is None else {"epochs": n, "train_seconds": seconds}
    return out


def card_peak(device: torch.device) -> tuple[str, float | None]:
    """(the device's name, its dense bf16 peak in TFLOP/s or None)."""
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((tflops for pattern, tflops in DENSE_BF16_TFLOPS if pattern in name),
                      None)


def run_prediction(args, data: Dataset, device: torch.device) -> list[dict]:
    """Time `predict`, its preparation (batch-norm folding) included, against the path it
    replaced, per variant, with and without TTA. The paths take turns every PREDICT_SLICE
    images, so that other work on a shared machine slows both alike."""
    # The validation images, repeated as needed: (predict_images, 32, 32, 3) uint8
    images = np.resize(data.val.images, (args.predict_images, *data.val.images.shape[1:]))
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

        def baseline(x, tta, model=model):  # predict as it was: unfolded, NCHW, one stream
            y = logits(model, to_device_images(x, device), batch_size=args.predict_batch,
                       tta=tta, bf16=precision == "bf16")
            return labels_and_probabilities(y)

        paths = {"baseline": baseline, "fast": partial(predict, fast_model, fuse=False, **kwargs)}
        for path in paths.values():  # warm-up: allocator, oneDNN/cuDNN primitives
            for tta in (False, True):  # the timed batch shapes, TTA's included
                path(images[: max(256, args.predict_batch)], tta=tta)
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
                "variant": variant, "tta": tta, "images": len(images), "baseline_seconds": base_s,
                "baseline_images_per_second": len(images) / base_s, "seconds": fast_s,
                "images_per_second": len(images) / fast_s, "speedup": base_s / fast_s,
                "max_prob_diff": float(np.abs(probs - base_probs).max(initial=0.0)),
                "labels_differ": int((labels != base_labels).sum()),
            })
            note(f"predict {variant} tta={tta}: baseline {len(images) / base_s:,.0f} img/s, "
                 f"fast {len(images) / fast_s:,.0f} img/s")
    return out


def _progress(metrics: dict) -> None:
    note(f"  epoch {int(metrics['epoch'])}: train loss {metrics['train/loss']:.3f}, "
         f"val acc {100 * metrics['val/acc']:.2f}%, {metrics['train_seconds']:.2f} s training")


def note(message: str) -> None:
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


def format_predict_table(rows: list[dict]) -> str:
    """One line per variant and TTA setting: the old path, the new one and their ratio."""
    header = (f"{'predict':<8} {'tta':<5} {'images':>7} {'baseline img/s':>14} "
              f"{'fast img/s':>10} {'speedup':>7} {'max |dp|':>9} {'labels differ':>13}")
    lines = [header, "-" * len(header)]
    lines += [f"{r['variant']:<8} {r['tta']!s:<5} {r['images']:>7,} "
              f"{r['baseline_images_per_second']:>14,.0f} {r['images_per_second']:>10,.0f} "
              f"{r['speedup']:>6.2f}x {r['max_prob_diff']:>9.1e} {r['labels_differ']:>13,}"
              for r in rows]
    return "\n".join(lines)


def format_table(rows: list[Row]) -> str:
    header = (f"{'recipe':<10} {'variant':<7} {'seed':>4} {'batch':>5} {'epochs':>6} "
              f"{'train s':>8} {'eval s':>6} {'compile s':>9} {'s/epoch':>8} {'img/s':>9} "
              f"{'TFLOP/s':>8} {'% peak':>7} {'val acc':>8} {'val TTA':>8} {'test acc':>8} "
              f"{'test TTA':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = "-" if r.peak_percent is None else f"{r.peak_percent:.1f}%"
        # `failed`: compiling was tried and fell back to eager
        compiled = (f"{r.compile_seconds:.1f}" if r.compiled
                    else "failed" if r.compile_fallback else "eager")
        lines.append(
            f"{r.recipe:<10} {r.variant:<7} {r.seed:>4} {r.batch_size:>5} {r.epochs:>6} "
            f"{r.train_seconds:>8.1f} {r.eval_seconds:>6.1f} {compiled:>9} "
            f"{r.seconds_per_epoch:>8.2f} {r.images_per_second:>9,.0f} {r.tflops:>8.1f} "
            f"{peak:>7} {_pct(r.val_acc):>8} {_pct(r.val_acc_tta):>8} {_pct(r.test_acc):>8} "
            f"{_pct(r.test_acc_tta):>8}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def load_data(args) -> Dataset:
    """The training source (synthetic for --smoke), with --test's images as the test split."""
    if args.data_source:
        data = DataConfig(**given(args, DATA_OPTIONS)).load(cache_dir=args.cache_dir)
    else:
        data = synthetic_dataset(args.train_size, args.val_size)
    if args.test:
        test = load_dataset(args.test, val_size=0, cache_dir=args.cache_dir)
        data = replace(data, test=test.test or test.train)
    return data


def environment(data: Dataset | None, device: torch.device, argv: list[str] | None) -> dict:
    """What ran where: card, peak, versions, commit, the exact command, the data once loaded."""
    name, peak = card_peak(device)
    command = sys.orig_argv if argv is None else ["python", "-m", "model.bench", *argv]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": name,
        "peak_bf16_tflops": peak,
        **versions(),
        "threads": torch.get_num_threads(),
        "load": "/".join(f"{x:.1f}" for x in os.getloadavg()),  # other work on this machine
        "commit": code_commit(),
        "command": shlex.join(command),
        **({} if data is None else {
            "train_images": len(data.train), "val_images": len(data.val),
            "test_images": len(data.test) if data.test is not None else 0,
            "data_digest": data.digest}),
    }


def versions() -> dict:
    """torch's, and the CUDA, cuDNN and Triton it runs with (None where absent): a compile
    that works with one set may fail with another."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "triton": triton}


def write_json(path: str, payload: dict) -> None:
    """Readers (and a run cut off mid-write) see the old file or the new one, whole."""
    with atomic_write(path, text=True) as f:
        json.dump(payload, f, indent=2)
