import pytest
import torch

from model.config import RECIPE_DEFAULTS, TrainConfig
from model.profiles import PROFILES, resolve_profile


def test_full_gives_fast_its_best_accuracy_budget_and_leaves_the_reports_recipes_alone():
    full = PROFILES["full"]
    fast = TrainConfig(recipe="fast", **full.overrides_for("fast"))
    assert fast.epochs > RECIPE_DEFAULTS["fast"]["epochs"] and fast.cutout > 0
    for recipe in ("reference", "paper"):
        config = TrainConfig(recipe=recipe, **full.overrides_for(recipe))
        assert config == TrainConfig(recipe=recipe), recipe  # the report's budget, untouched
    assert full.train_size is None  # the whole training split


@pytest.mark.parametrize("recipe", sorted(RECIPE_DEFAULTS))
def test_smoke_and_quick_shrink_every_recipe(recipe):
    for name in ("smoke", "quick"):
        config = TrainConfig(recipe=recipe, **PROFILES[name].overrides_for(recipe))
        assert config.epochs <= 2 and PROFILES[name].train_size <= 1000


def test_auto_is_full_on_a_gpu_and_quick_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_profile("auto")[0].name == "full"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profile, why = resolve_profile("auto")
    assert profile.name == "quick" and "no CUDA" in why


def test_an_unknown_profile_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown profile 'huge'.*smoke, quick, full"):
        resolve_profile("huge")
