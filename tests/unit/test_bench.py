import dataclasses
import json

import pytest
import torch

from model import bench
from model.bench import format_ratios
from model.measure import (
    Row,
    card_peak,
    format_predict_table,
    format_table,
    time_to_accuracy,
    train_config,
)
from model.nets import ModifiedResNet


def narrow(variant=None):
    """The report's block layout at a tenth of the width: the same code path, quickly."""
    return ModifiedResNet((1, 1, 1), widths=(8, 16, 32))


@pytest.fixture
def narrow_nets(monkeypatch):
    monkeypatch.setattr("model.train.build_model", narrow)
    monkeypatch.setattr("model.measure.build_model", narrow)


def row(recipe, variant, s_per_epoch, acc=0.9, seed=0):
    return Row(recipe, variant, seed, 2, 2 * s_per_epoch, 0.0, s_per_epoch, 1000.0, 1.0, 0.1,
               acc, None, None)


def test_ratios_compare_each_recipe_with_reference_of_the_same_variant():
    text = format_ratios([row("reference", "deep", 8.0), row("paper", "deep", 2.0),
                          row("reference", "light", 6.0), row("fast", "light", 1.0)])
    assert "paper/deep: 4.0x faster" in text and "fast/light: 6.0x faster" in text


def test_table_has_a_row_per_run():
    table = format_table([row("fast", "deep", 1.0), row("fast", "light", 0.5)])
    assert table.splitlines()[0].split()[:2] == ["recipe", "variant"]
    assert len(table.splitlines()) == 4 and "90.00%" in table


@pytest.mark.slow
def test_smoke_benchmark_runs_every_recipe(tmp_path, narrow_nets, capsys):
    out = tmp_path / "results.json"
    assert bench.main(["--smoke", "--variants", "light", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["recipe"] for r in rows] == ["reference", "paper", "fast"]
    assert all(r["images_per_second"] > 0 and r["train_seconds"] > 0 for r in rows)
    assert all(r["epochs"] == 1 and len(r["history"]) == 1 for r in rows)
    assert result["env"]["commit"] != "unknown" and result["env"]["train_images"] == 4
    stdout = capsys.readouterr().out
    assert "paper/light:" in stdout and "fast/light:" in stdout


@pytest.mark.slow
def test_predict_mode_times_with_and_without_tta(tmp_path, narrow_nets):
    out = tmp_path / "predict.json"
    assert bench.main(["--smoke", "--predict", "--variants", "light", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["predict"]
    assert [(r["variant"], r["tta"]) for r in rows] == [("light", False), ("light", True)]
    assert all(r["images"] == bench.SMOKE_IMAGES and r["images_per_second"] > 0 for r in rows)
    assert all(r["baseline_images_per_second"] > 0 and r["speedup"] > 0 for r in rows)
    # The fast path predicts what the old one did.
    assert all(r["labels_differ"] == 0 and r["max_prob_diff"] < 1e-4 for r in rows)


def test_predict_table_shows_the_baseline_the_fast_path_and_their_ratio():
    rows = [{"variant": v, "tta": t, "images": 10_000, "baseline_images_per_second": 80.0,
             "images_per_second": 200.0 if v == "light" else 100.0, "speedup": s,
             "max_prob_diff": 3e-7, "labels_differ": 0}
            for v, s in (("deep", 1.25), ("light", 2.5)) for t in (False, True)]
    lines = format_predict_table(rows).splitlines()
    assert "baseline img/s" in lines[0] and "fast img/s" in lines[0] and "speedup" in lines[0]
    assert len(lines) == 6
    assert lines[4].split() == ["light", "False", "10,000", "80", "200", "2.50x", "3.0e-07", "0"]
    assert lines[3].split()[:2] == ["deep", "True"] and "1.25x" in lines[3]


def test_a_profile_sets_the_recipe_and_options_win():
    from model.bench import parse_args

    def config(argv, recipe="fast"):
        return train_config(parse_args(argv), recipe, "light", 0, torch.device("cpu"))

    full = config(["--profile", "full", "--data", "x"])
    assert (full.epochs, full.cutout) == (120, 12)
    assert config(["--profile", "full", "--data", "x"], "reference") == config(
        ["--data", "x"], "reference")
    given = config(["--profile", "full", "--data", "x", "--epochs", "3", "--ema", "0.99"])
    assert (given.epochs, given.cutout, given.ema) == (3, 12, 0.99)
    plain = config(["--data", "x"])
    assert (plain.epochs, plain.cutout, plain.workers) == (40, 0, bench.WORKERS)


def test_every_training_option_is_a_bench_option_and_reaches_each_row():
    args = bench.parse_args(["--data", "x", "--precision", "fp32", "--lr", "0.05",
                             "--no-tta", "--recipes", "paper,fast", "--seeds", "1,2"])
    assert (args.recipes, args.variants, args.seeds) == (["paper", "fast"], ["deep", "light"],
                                                         [1, 2])
    config = train_config(args, "paper", "deep", 2, torch.device("cpu"))
    assert (config.precision, config.lr, config.tta, config.seed) == ("fp32", 0.05, False, 2)
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", "x", "--precision", "fp16"])


def test_the_table_says_whether_each_step_ran_compiled():
    compiled = dataclasses.replace(row("fast", "deep", 1.0), compile_seconds=41.25, compiled=True)
    failed = dataclasses.replace(row("fast", "light", 1.0), compile_seconds=3.0,
                                 compile_fallback=True)
    eager = row("reference", "light", 6.0)
    lines = format_table([compiled, failed, eager]).splitlines()
    assert [line.split()[7] for line in lines[2:]] == ["41.2", "failed", "eager"]


def test_time_to_accuracy_sums_training_seconds_up_to_the_first_epoch_at_the_goal():
    history = [{"val/acc": acc, "train_seconds": 2.0, "eval_seconds": 9.0}
               for acc in (0.5, 0.91, 0.89, 0.95)]
    assert time_to_accuracy(history, (0.9, 0.94, 0.99)) == {
        "0.900": {"epochs": 2, "train_seconds": 4.0},  # evaluation time not counted
        "0.940": {"epochs": 4, "train_seconds": 8.0},
        "0.990": None,
    }


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200 NVL", 835.0), ("NVIDIA GeForce RTX 4090", None),
])
def test_the_card_peak_comes_from_its_name(name, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert card_peak(torch.device("cuda")) == (name, peak)
    assert card_peak(torch.device("cpu"))[1] is None


def test_peak_share_is_empty_for_a_card_without_a_known_peak():
    unknown = dataclasses.replace(row("fast", "deep", 1.0), peak_percent=None)
    assert format_table([unknown]).splitlines()[2].split()[11] == "-"
