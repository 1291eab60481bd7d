"""Train both variants with model/ alone: `python -m model --data SOURCE [--profile P]`.

The orchestrated pipeline (`cifar-pipeline run`) does the same with tracking, registry
and scoring; this entry point needs nothing but PyTorch, for a bare GPU machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import get_args

from model.config import DataConfig, TrainConfig, Variant, add_options, given, option_specs
from model.profiles import PROFILES, resolve_profile
from model.train import fit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__.split("\n")[0])
    # Every training and data option, from the config's fields, on top of the profile's.
    add_options(p, [("variants", list[Variant], list(get_args(Variant)), "networks to train"),
                    *option_specs(TrainConfig, DataConfig, skip=("variant",))],
                aliases={"data_source": "--data"})
    p.add_argument("--profile", default="auto", choices=["auto", *PROFILES],
                   help="training budget: auto = full on a GPU, quick on a CPU")
    p.add_argument("--checkpoint-dir", help="resume from and write checkpoints here")
    args = p.parse_args(argv)
    profile, why = resolve_profile(args.profile)
    print(why, flush=True)
    data = DataConfig(**{"val_size": profile.val_size, "train_size": profile.train_size,
                         **given(args, DataConfig.__dataclass_fields__)}
                      ).load(os.environ.get("CIFAR10_SOURCE", "torchvision"))
    print(f"data {data.digest[:12]}: {len(data.train):,} train, {len(data.val):,} validation",
          flush=True)
    options = given(args, TrainConfig.__dataclass_fields__)
    recipe = TrainConfig(**options).recipe
    results = {}
    for variant in args.variants or list(get_args(Variant)):
        config = TrainConfig(**{**profile.overrides_for(recipe), **options, "variant": variant})

        def show(m, variant=variant, epochs=config.epochs):
            print(f"{variant} epoch {int(m['epoch']) + 1}/{epochs}: "
                  f"train loss {m['train/loss']:.3f}, val acc {100 * m['val/acc']:.2f}%, "
                  f"{m['epoch_seconds']:.1f} s", flush=True)

        ckpt = os.path.join(args.checkpoint_dir, variant) if args.checkpoint_dir else None
        results[variant] = fit(config, data, on_epoch_end=show, checkpoint_dir=ckpt).metrics
    print(f"\n{'variant':<8} {'epochs':>6} {'train s':>8} {'val acc':>8} {'val TTA':>8}")
    for variant, m in results.items():
        tta = f"{100 * m['val/acc_tta']:.2f}%" if "val/acc_tta" in m else "-"
        print(f"{variant:<8} {int(m['epochs']):>6} {m['train_seconds']:>8.1f} "
              f"{100 * m['val/acc']:>7.2f}% {tta:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
