"""Named training budgets, shared by the command line and the flows."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.config import ConfigError


@dataclass(frozen=True)
class Profile:
    name: str
    train_size: int | None  # stratified subset of the training split; None keeps all
    val_size: int  # images held out of the training source for validation
    overrides: dict  # TrainConfig fields set on top of any recipe's defaults
    description: str
    fast_overrides: dict = field(default_factory=dict)  # on top of those, `fast` only

    def overrides_for(self, recipe: str) -> dict:
        """TrainConfig fields this profile sets for `recipe` (`fast_overrides` for fast only)."""
        return {**self.overrides, **(self.fast_overrides if recipe == "fast" else {})}


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", 512, 256, {"epochs": 1, "batch_size": 128},
                     "512 images for 1 epoch: checks the plumbing, not the model"),
    "quick": Profile("quick", 1000, 500, {"epochs": 2, "batch_size": 64},
                     "1,000 images for 2 epochs: a few minutes on a laptop CPU"),
    # Best accuracy within 5 minutes of training on one H100. An earlier H100 run of this
    # recipe gave deep 93.2% (flip TTA) in about 165 s with cutout and 80 epochs; 120
    # epochs fit the budget at that speed. Not yet measured with this code.
    "full": Profile("full", None, 5000, {},
                    "the whole training set; fast trains 120 epochs with 12-pixel cutout",
                    fast_overrides={"epochs": 120, "cutout": 12}),
}


def resolve_profile(name: str) -> tuple[Profile, str]:
    """(profile, why): `auto` is `full` on a GPU and `quick` on a CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return PROFILES["full"], "auto: a CUDA device is present, using the full profile"
        return PROFILES["quick"], "auto: no CUDA device, using the quick profile"
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}: valid profiles are auto, "
                         + ", ".join(PROFILES))
    return PROFILES[name], f"profile {name}: {PROFILES[name].description}"
