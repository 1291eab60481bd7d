import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bench import Row, baseline_predict, format_predict_table, format_ratios, format_table
from model.nets import build_model
from model.predict import predict

ROOT = Path(__file__).resolve().parents[2]


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
def test_smoke_benchmark_runs_every_recipe_and_variant(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "model.bench", "--smoke", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["recipe"], r["variant"]) for r in rows} == {
        (rc, v) for rc in ("reference", "paper", "fast") for v in ("deep", "light")}
    assert "paper/deep:" in result.stdout and "fast/light:" in result.stdout
    assert all(r["images_per_second"] > 0 for r in rows)


@pytest.mark.slow
def test_predict_mode_times_both_variants_with_and_without_tta(tmp_path):
    out = tmp_path / "predict.json"
    result = subprocess.run([sys.executable, "-m", "model.bench", "--smoke", "--predict",
                             "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["predict"]
    assert {(r["variant"], r["tta"]) for r in rows} == {
        (v, t) for v in ("deep", "light") for t in (False, True)}
    assert all(r["images"] == 64 and r["images_per_second"] > 0 for r in rows)
    assert all(r["baseline_images_per_second"] > 0 and r["speedup"] > 0 for r in rows)
    # The fast path predicts what the old one did.
    assert all(r["labels_differ"] == 0 and r["max_prob_diff"] < 1e-4 for r in rows)
    assert "baseline img/s" in result.stdout and "\nlight " in result.stdout


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


def test_baseline_predict_is_the_unfused_path():
    torch.manual_seed(0)
    model = build_model("light").eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels, probs = baseline_predict(model, images, batch_size=1000, device=torch.device("cpu"))
    ref_labels, ref_probs = predict(model, images, fuse=False)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-5, atol=1e-6)


def test_a_profile_sets_the_recipe_and_options_win():
    from model.bench import config_overrides, parse_args

    args = parse_args(["--profile", "full", "--data", "x"])
    assert config_overrides(args, "fast") == {"epochs": 120, "cutout": 12}
    assert config_overrides(args, "reference") == {}
    args = parse_args(["--profile", "full", "--data", "x", "--epochs", "3", "--ema", "0.99"])
    assert config_overrides(args, "fast") == {"epochs": 3, "cutout": 12, "ema": 0.99}
    assert config_overrides(parse_args(["--data", "x"]), "fast") == {}


def test_the_table_says_whether_each_step_ran_compiled():
    import dataclasses

    compiled = dataclasses.replace(row("fast", "deep", 1.0), compile_seconds=41.25, compiled=True)
    failed = dataclasses.replace(row("fast", "light", 1.0), compile_seconds=3.0)
    eager = row("reference", "light", 6.0)
    lines = format_table([compiled, failed, eager]).splitlines()
    assert [line.split()[5] for line in lines[2:]] == ["41.2", "failed", "eager"]
