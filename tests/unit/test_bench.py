import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.bench import Row, format_ratios, format_table

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
    assert "predict light" in result.stdout
