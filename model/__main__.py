"""Train both variants with model/ alone: `python -m model --data SOURCE [--profile P]`.

The orchestrated pipeline (`cifar-pipeline run`) does the same with tracking, registry
and scoring; this entry point needs nothing but PyTorch, for a bare GPU machine.
"""

from __future__ import annotations

import argparse
import os
import sys

from model.config import DataConfig
from model.profiles import resolve_profile
from model.train import TrainConfig, fit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("CIFAR10_SOURCE", "torchvision"),
                   help="data source (default: $CIFAR10_SOURCE, else torchvision's download)")
    p.add_argument("--profile", default="auto", help="auto, smoke, quick or full")
    p.add_argument("--recipe", default="fast", choices=["reference", "paper", "fast"])
    p.add_argument("--variants", default="deep,light")
    p.add_argument("--checkpoint-dir", help="resume from and write checkpoints here")
    args = p.parse_args(argv)
    profile, why = resolve_profile(args.profile)
    print(why, flush=True)
    data = DataConfig(data_source=args.data, val_size=profile.val_size,
                      train_size=profile.train_size).load()
    print(f"data {data.digest[:12]}: {len(data.train):,} train, {len(data.val):,} validation",
          flush=True)
    results = {}
    for variant in [v for v in args.variants.split(",") if v]:
        config = TrainConfig(recipe=args.recipe, variant=variant,
                             **profile.overrides_for(args.recipe))

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
