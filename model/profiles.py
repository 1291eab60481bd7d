"""Named training budgets, shared by the command line and the flows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Profile:
    name: str
    train_size: int | None  # stratified subset of the training split; None keeps all
    val_size: int  # images held out of the training source for validation
    overrides: dict  # TrainConfig fields set on top of the recipe's defaults
    description: str


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", 512, 256, {"epochs": 1, "batch_size": 128},
                     "512 images for 1 epoch: checks the plumbing, not the model"),
    "quick": Profile("quick", 1000, 500, {"epochs": 2, "batch_size": 64},
                     "1,000 images for 2 epochs: a few minutes on a laptop CPU"),
    "full": Profile("full", None, 5000, {},
                    "the tuned fast recipe on the whole training set"),
}


def resolve_profile(name: str) -> tuple[Profile, str]:
    """(profile, why): `auto` is `full` on a GPU and `quick` on a CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return PROFILES["full"], "auto: a CUDA device is present, using the full profile"
        return PROFILES["quick"], "auto: no CUDA device, using the quick profile"
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: valid profiles are auto, "
                         + ", ".join(PROFILES))
    return PROFILES[name], f"profile {name}: {PROFILES[name].description}"
