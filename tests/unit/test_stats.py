"""Seed statistics against values computed by hand and against printed t tables."""

import math

import pytest

from model import stats


@pytest.mark.parametrize(("df", "q975", "q995"), [
    (1, 12.706, 63.657), (2, 4.303, 9.925), (3, 3.182, 5.841), (4, 2.776, 4.604),
    (5, 2.571, 4.032), (10, 2.228, 3.169), (30, 2.042, 2.750), (120, 1.980, 2.617),
    (1e6, 1.960, 2.576)])
def test_t_quantiles_match_the_printed_table(df: float, q975: float, q995: float) -> None:
    assert stats.t_quantile(0.975, df) == pytest.approx(q975, abs=5e-4)
    assert stats.t_quantile(0.995, df) == pytest.approx(q995, abs=5e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-q975, abs=5e-4)


@pytest.mark.parametrize("x", [0.3, 1.0, 4.0, 30.0])
def test_t_cdf_matches_the_closed_forms_of_one_and_two_df(x: float) -> None:
    assert stats.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-9)
    assert stats.t_cdf(-x, 2) == pytest.approx(0.5 - x / (2 * math.sqrt(2 + x * x)), abs=1e-9)


def test_t_quantile_refuses_what_has_none() -> None:
    for p, df in ((0, 3), (1, 3), (0.5, 0), (float("nan"), 3)):
        with pytest.raises(ValueError, match="0 < p < 1 and df > 0"):
            stats.t_quantile(p, df)


def test_spread_by_hand() -> None:
    # mean 0.92; deviations -0.02, 0, 0.02: variance 0.0008 / 2 = 0.0004, std 0.02.
    s = stats.spread([0.90, 0.92, 0.94, None, math.nan])
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.92)
    assert s["std"] == pytest.approx(0.02)
    one = stats.spread([0.5])
    assert (one["n"], one["mean"], math.isnan(one["std"])) == (1, 0.5, True)
    assert stats.fmt(s) == "92.00 ± 2.00 (n=3)"
    assert stats.fmt(s, unit="%") == "92.00 ± 2.00% (n=3)"
    assert stats.fmt(one) == "50.00"
    assert stats.fmt(stats.spread([])) == "-"


def test_welch_by_hand_when_the_interval_holds_zero() -> None:
    # Equal variances (0.0004) and sizes (3): df = 2 (n - 1) = 4, t = 2.776445;
    # se = sqrt(2 * 0.0004 / 3) = 0.0163299, half width 0.0453392 around 0.02.
    d = stats.welch([0.90, 0.92, 0.94], [0.88, 0.90, 0.92])
    assert d["df"] == pytest.approx(4)
    assert d["diff"] == pytest.approx(0.02)
    assert (d["low"], d["high"]) == pytest.approx((-0.0253392, 0.0653392), abs=1e-6)
    assert "not distinguishable from seed noise" in stats.verdict(d)


def test_welch_by_hand_when_deep_is_ahead() -> None:
    # Variances 0.00005 each, n = 2: se = sqrt(0.00005) = 0.0070711, df = 2,
    # t = 4.302653, half width 0.0304243 around 0.04: the interval clears zero.
    d = stats.welch([0.94, 0.95], [0.90, 0.91])
    assert d["df"] == pytest.approx(2)
    assert (d["low"], d["high"]) == pytest.approx((0.0095757, 0.0704243), abs=1e-6)
    assert stats.verdict(d) == ("+4.00 points, 95% CI [+0.96, +7.04] (Welch, 2.0 df): "
                                "distinguishable from seed noise, deep is more accurate")


def test_welch_df_with_unequal_spreads_by_hand() -> None:
    # va = 0.005 / 2, vb = 0.00125 / 2: df = (va + vb)^2 / (va^2 + vb^2) = 1.470588.
    d = stats.welch([0.5, 0.6], [0.4, 0.45])
    assert d["df"] == pytest.approx(1.470588, abs=1e-6)
    half = stats.t_quantile(0.975, d["df"]) * math.sqrt(0.003125)
    assert d["high"] - d["diff"] == pytest.approx(half)
    assert 4.303 < stats.t_quantile(0.975, d["df"]) < 12.706


def test_one_seed_gives_no_interval_and_says_so() -> None:
    assert stats.welch([0.9], [0.8, 0.85]) is None
    assert stats.verdict(None) == "no interval: needs two or more seeds per variant"
    # Seeds that agree exactly: a zero-width interval, not a division by zero.
    assert stats.welch([0.5, 0.5], [0.4, 0.4]) == {"diff": pytest.approx(0.1),
                                                   "low": pytest.approx(0.1),
                                                   "high": pytest.approx(0.1), "df": 2.0}


def test_seed_statistics_and_their_metric_names() -> None:
    rows = [("deep", {"val/acc": 0.94, "test/acc": 0.92}),
            ("deep", {"val/acc": 0.95, "test/acc": 0.925}),
            ("light", {"val/acc": 0.90}), ("light", {"val/acc": 0.91})]
    s = stats.seed_statistics(rows)
    assert s["variants"]["deep"]["val/acc"]["mean"] == pytest.approx(0.945)
    assert s["variants"]["light"]["test/acc"]["n"] == 0
    assert s["deep_minus_light"]["test/acc"] is None
    assert "val/acc_tta" not in s["variants"]["deep"]
    m = stats.as_metrics(s)
    assert m["seeds/deep/val/acc/n"] == 2
    assert m["seeds/light/val/acc/std"] == pytest.approx(0.0070711, abs=1e-6)
    assert m["deep_minus_light/val/acc/ci95_low"] == pytest.approx(0.0095757, abs=1e-6)
    assert m["deep_minus_light/val/acc/df"] == pytest.approx(2)
    assert not any(k.startswith("deep_minus_light/test/acc") for k in m)
    assert "seeds/light/test/acc/mean" not in m  # NaN: left out
    assert "deep_minus_light" not in stats.seed_statistics([("deep", {"val/acc": 0.9})])


def _version(number: int, variant: str, seed: int, val: float, digest: str = "d" * 64,
             recipe: str = "fast", **extra: str):
    from types import SimpleNamespace

    return SimpleNamespace(version=str(number), tags={
        "variant": variant, "seed": str(seed), "val_acc": repr(val), "data_digest": digest,
        "recipe": recipe, **extra})


def test_summary_rows_over_seeds_and_the_one_seed_case() -> None:
    from flows.summary import seed_rows

    two = stats.seed_statistics([("deep", {"val/acc": 0.94}), ("deep", {"val/acc": 0.95}),
                                 ("light", {"val/acc": 0.90}), ("light", {"val/acc": 0.91})])
    assert seed_rows(two) == [
        ("deep over seeds", "val acc 94.50 ± 0.71% (n=2)"),
        ("light over seeds", "val acc 90.50 ± 0.71% (n=2)"),
        ("deep − light val acc", stats.verdict(two["deep_minus_light"]["val/acc"]))]
    one = stats.seed_statistics([("deep", {"val/acc": 0.94}), ("light", {"val/acc": 0.90})])
    assert seed_rows(one)[-1] == ("deep − light val acc",
                                  "no interval: needs two or more seeds per variant")


def test_models_compare_groups_versions_by_digest_and_recipe() -> None:
    from flows.summary import _group_rows, version_seed_groups

    versions = [_version(1, "deep", 0, 0.10), _version(2, "deep", 0, 0.94),  # v2 replaces v1
                _version(3, "deep", 1, 0.95, test_acc="0.93"),
                _version(4, "light", 0, 0.90), _version(5, "light", 1, 0.91),
                _version(6, "light", 0, 0.5, recipe="paper"),
                _version(7, "deep", 9, 0.5, digest="e" * 64)]
    lines = [row for group in version_seed_groups(versions) for row in _group_rows(group)]
    assert [line for line in lines if line[0].startswith("data ")] == [
        ("data " + "d" * 16, "recipe fast"), ("data " + "d" * 16, "recipe paper"),
        ("data " + "e" * 16, "recipe fast")]
    fast = dict(lines[1:lines.index(("data " + "d" * 16, "recipe paper"))])
    assert fast["deep over seeds"] == "val acc 94.50 ± 0.71% (n=2); test acc 93.00%"
    assert fast["light over seeds"] == "val acc 90.50 ± 0.71% (n=2)"
    assert fast["deep − light val acc"].startswith("+4.00 points, 95% CI [+0.96, +7.04]")
    assert fast["deep − light test acc"] == "no interval: needs two or more seeds per variant"


def test_the_summary_gives_the_champions_test_accuracy_beside_its_selection(capsys):
    """Selection saw only validation accuracy; a labelled test split gives the unbiased
    figure, and without one the summary says how to get it."""
    from flows.summary import print_summary

    doc = {"tracking_uri": "sqlite:///x", "mlflow_run_id": "r", "data_digest": "d" * 64,
           "jobs": [{"job": "deep-seed0", "version": "3", "val_acc": 0.9350}],
           "seed_stats": {"variants": {}}, "predictions": None,
           "champion": {"uri": "models:/cifar10-resnet@champion", "version": "3",
                        "promoted": True, "reason": "first champion", "test_acc": 0.9312}}
    print_summary(doc)
    out = capsys.readouterr().out
    assert "chosen on validation accuracy, which therefore reads high for it" in out
    assert "its test accuracy, which took no part: 93.12%" in out
    doc["champion"]["test_acc"] = None
    print_summary(doc)
    assert "a source with a labelled test split would give an unbiased figure" in \
        capsys.readouterr().out
