"""The promotion decision as a pure comparison: candidates against the champion's accuracy
on the same validation images. No registry, no MLflow store: tests/flows/test_promotion.py
covers the reads and writes around it."""

from __future__ import annotations

import math

import pytest

from tasks.promote import Champion, compare
from tasks.training import VariantResult

DIGEST = "ab" * 32


def candidate(version: str, val_acc: float, variant: str = "light") -> VariantResult:
    return VariantResult(variant=variant, seed=0, recipe="fast", run_id=f"run-{version}",
                         version=version, metrics={"val/acc": val_acc}, val_digest=DIGEST)


def test_no_candidates_changes_nothing() -> None:
    for champion in (None, Champion("3", 0.9)):
        decision = compare([], champion, DIGEST)
        assert not decision.promoted
        assert decision.champion_version == (champion and champion.version)
        assert decision.candidate_version is None


def test_the_best_candidate_is_the_first_champion() -> None:
    decision = compare([candidate("1", 0.3), candidate("2", 0.4, "deep")], None, DIGEST)
    assert decision.promoted
    assert decision.champion_version == "2"
    assert (decision.previous_version, decision.previous_acc) == (None, None)
    assert "first champion" in decision.reason


@pytest.mark.parametrize(("best", "promoted"), [(0.85, True), (0.8, False), (0.75, False)])
def test_only_a_strictly_better_candidate_takes_champion(best: float, promoted: bool) -> None:
    candidates = [candidate("7", best, "deep"), candidate("8", best - 0.1)]
    decision = compare(candidates, Champion("4", 0.8), DIGEST)
    assert decision.promoted is promoted
    assert decision.champion_version == ("7" if promoted else "4")
    assert decision.candidate_version == "7"  # the best candidate is the one compared
    assert decision.candidate_acc == best
    assert (decision.previous_version, decision.previous_acc) == ("4", 0.8)
    assert DIGEST[:12] in decision.reason


def test_a_champion_of_unknown_accuracy_is_replaced() -> None:
    decision = compare([candidate("2", 0.1)], Champion("1", math.nan), DIGEST)
    assert decision.promoted
    assert decision.champion_version == "2"
    assert math.isnan(decision.previous_acc)


def test_a_candidate_that_already_is_champion_is_not_promoted_again() -> None:
    decision = compare([candidate("5", 0.9)], Champion("5", 0.9), DIGEST)
    assert not decision.promoted
    assert decision.champion_version == "5"
    assert "already champion" in decision.reason


def test_accuracies_measured_on_other_images_are_not_compared() -> None:
    from dataclasses import replace

    elsewhere = replace(candidate("6", 0.99), val_digest="cd" * 32)
    with pytest.raises(ValueError, match="versions 6 were validated on other images"):
        compare([candidate("5", 0.5), elsewhere], Champion("4", 0.8), DIGEST)


def test_the_comparison_table_gives_mean_std_and_n_over_seeds() -> None:
    from tasks.promote import comparison_rows

    results = [candidate("1", 0.94, "deep"), candidate("2", 0.95, "deep"),
               candidate("3", 0.90)]
    results[0].metrics["test/acc"] = 0.93
    deep, light = comparison_rows(results)
    assert (deep["variant"], deep["seeds"], deep["val acc %"]) == ("deep", "2",
                                                                    "94.50 ± 0.71 (n=2)")
    assert deep["test acc %"] == "93.00" and deep["val acc TTA %"] == "-"
    assert (light["val acc %"], light["versions"]) == ("90.00", "3")
