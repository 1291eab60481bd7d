"""The GPU check (`python -m model.bench --check`), run on the CPU: its file, its rows, its
targets. Training is faked, or done by a narrow network in the one `slow` test."""

import dataclasses
import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from model import bench, gpucheck, measure
from model.nets import ModifiedResNet

LIGHT_TARGETS = {1, 2, 4, 5}


@pytest.fixture
def narrow_nets(monkeypatch):
    """The report's block layout at a tenth of the width: the same code path, quickly."""
    def narrow(variant):
        return ModifiedResNet((1, 1, 1), widths=(8, 16, 32))

    monkeypatch.setattr("model.train.build_model", narrow)
    monkeypatch.setattr("model.measure.build_model", narrow)


def fake_row(recipe, variant, seconds_per_epoch=1.0, **kw) -> measure.Row:
    fields = dict(recipe=recipe, variant=variant, seed=0, epochs=3, train_seconds=3.0,
                  compile_seconds=0.0, seconds_per_epoch=seconds_per_epoch,
                  images_per_second=1000.0, tflops=1.0, peak_percent=None, val_acc=0.5,
                  val_acc_tta=None, test_acc=None)
    return measure.Row(**{**fields, **kw})


def train_dict(recipe, variant, row=None, **kw) -> dict:
    return {"kind": "train", "row": row or f"{recipe}/{variant}",
            **dataclasses.asdict(fake_row(recipe, variant, **kw))}


def test_targets_say_met_unmet_or_unmeasured():
    rows = [
        train_dict("paper", "deep", seconds_per_epoch=2.0),
        train_dict("reference", "deep", seconds_per_epoch=10.0),  # 5x: met
        # 90% first reached after 25 s of training, over the 20 s goal: unmet.
        train_dict("fast", "deep", peak_percent=30.0,
                   time_to_accuracy={"0.900": {"epochs": 20, "train_seconds": 25.0}}),
        {"kind": "predict", "variant": "deep", "tta": False, "images": 5000, "seconds": 0.25},
        {"kind": "predict", "variant": "deep", "tta": True, "images": 5000, "seconds": 0.6},
    ]
    targets = {(t["target"], t["variant"]): t
               for t in gpucheck.evaluate_targets("default", rows, ["deep", "light"])}
    assert set(targets) == {(n, v) for n in LIGHT_TARGETS for v in ("deep", "light")}
    assert targets[1, "deep"]["measured"] == pytest.approx(5.0)
    assert targets[1, "deep"]["met"] is True
    assert (targets[2, "deep"]["measured"], targets[2, "deep"]["met"]) == (25.0, False)
    assert targets[4, "deep"]["met"] is True
    # The slower of the two, scaled to 10,000 images: 1.2 s, over the 1 s goal.
    assert targets[5, "deep"]["measured"] == pytest.approx(1.2)
    assert targets[5, "deep"]["met"] is False
    assert all(targets[n, "light"]["met"] is None and targets[n, "light"]["measured"] is None
               for n in LIGHT_TARGETS)


def test_a_fast_run_that_never_reaches_the_accuracy_misses_target_2():
    rows = [train_dict("fast", "light", time_to_accuracy={"0.896": None})]
    (t2,) = [t for t in gpucheck.evaluate_targets("default", rows, ["light"])
             if t["target"] == 2]
    assert (t2["measured"], t2["met"]) == (None, False)


@pytest.mark.parametrize(("acc", "seconds", "met"),
                         [(0.94, 250.0, True), (0.94, 320.0, False), (0.93, 250.0, False)])
def test_best_mode_needs_the_accuracy_within_five_minutes_of_training(acc, seconds, met):
    rows = [train_dict("fast", "deep", val_acc=0.9, val_acc_tta=acc, train_seconds=seconds)]
    (t3,) = gpucheck.evaluate_targets("best", rows, ["deep"])
    assert (t3["target"], t3["measured"], t3["goal"]) == (3, acc, 0.935)
    assert t3["met"] is met and t3["train_seconds"] == seconds


def test_targets_2_and_4_take_the_best_fast_row_and_name_it():
    rows = [train_dict("fast", "light", peak_percent=15.0,
                       time_to_accuracy={"0.896": {"epochs": 18, "train_seconds": 16.0}}),
            train_dict("fast", "light", row="fast/light b1024", peak_percent=24.0,
                       time_to_accuracy={"0.896": {"epochs": 16, "train_seconds": 14.0}})]
    t = {t["target"]: t for t in gpucheck.evaluate_targets("default", rows, ["light"])}
    assert (t[2]["measured"], t[2]["met"], t[2]["row"]) == (14.0, True, "fast/light b1024")
    assert (t[4]["measured"], t[4]["met"], t[4]["row"]) == (24.0, True, "fast/light b1024")


def test_the_summary_says_when_a_ratio_was_measured_with_the_compile_fallback(tmp_path):
    rows = [train_dict("paper", "deep", seconds_per_epoch=2.0, compile_fallback=True),
            train_dict("reference", "deep", seconds_per_epoch=10.0)]
    report = gpucheck.Report(str(tmp_path / "r.json"), "default",
                             measure.environment(None, torch.device("cpu"), []), ["deep"])
    report.add(rows)
    (t1,) = [t for t in report.payload["targets"] if t["target"] == 1]
    assert t1["fallback"] == ["paper/deep"]
    summary = gpucheck.format_summary(report.payload)
    assert "measured with a fallback: paper/deep ran the plain step" in summary
    env = report.payload["env"]
    assert {"torch", "cuda", "cudnn", "triton"} <= set(env) and env["torch"] == torch.__version__


def fake_measurements(monkeypatch, on_train=None, train_seconds=None):
    """train_row and run_prediction replaced by instant fakes; on_train(call, config)
    runs first in each training row."""
    calls = []

    def train_row(config, data, device, goals=(), verbose=False):
        calls.append(config)
        if on_train is not None:
            on_train(len(calls), config)
        return fake_row(config.recipe, config.variant, compiled=config.compiles_on(device),
                        seconds_per_epoch={"reference": 4.0}.get(config.recipe, 1.0),
                        epochs=config.epochs or 1,
                        train_seconds=(train_seconds or {}).get(config.recipe, 3.0))

    def run_prediction(args, data, device):
        return [{"variant": v, "tta": t, "images": 8, "seconds": 0.0004,  # 0.5 s per 10,000
                 "images_per_second": 800.0, "baseline_seconds": 0.02,
                 "baseline_images_per_second": 400.0, "speedup": 2.0, "max_prob_diff": 0.0,
                 "labels_differ": 0} for v in args.variants for t in (False, True)]

    monkeypatch.setattr(measure, "train_row", train_row)
    monkeypatch.setattr(measure, "run_prediction", run_prediction)
    return calls


def check(tmp_path, *args):
    out = tmp_path / "check.json"
    code = bench.main(["--check", "--smoke", "--out", str(out), *args])
    return code, json.loads(out.read_text())


SPEED_ROWS = ["paper/light", "reference/light"]
LIGHT_ROWS = ["predict", *SPEED_ROWS, "fast/light", "fast/light eager",
              "fast/light eager b1024", "fast/light b1024", "paper/light reduce-overhead",
              "paper/light whole-step graph"]


def test_each_row_is_in_the_file_before_the_next_begins_and_a_failure_keeps_the_rest(
        tmp_path, monkeypatch):
    seen = []

    def on_train(call, config):
        seen.append([r["row"] for r in json.loads((tmp_path / "check.json").read_text())
                     ["rows"]])
        if config.recipe == "paper":
            raise RuntimeError("CUDA out of memory")

    fake_measurements(monkeypatch, on_train)
    code, result = check(tmp_path, "--variants", "light")
    assert seen[:3] == [["predict", "predict"], ["predict", "predict", "paper/light"],
                        ["predict", "predict", "paper/light", "reference/light"]]
    assert code == 1 and result["status"] == "failed" and "current" not in result
    assert [r["row"] for r in result["rows"]] == ["predict", *LIGHT_ROWS]
    failed = result["rows"][2]
    assert failed["kind"] == "error" and failed["error"] == "RuntimeError: CUDA out of memory"
    # Target 1 needs both rows; the others were measured.
    met = {t["target"]: t["met"] for t in result["targets"]}
    assert met[1] is None and met[2] is False and met[5] is True


def test_a_row_predicted_to_end_past_the_budget_is_skipped_before_it_starts(
        tmp_path, monkeypatch):
    """Each row takes (and reports) 10 times its prior per epoch, for its 2 epochs: paper
    33 s, reference 86 s, fast 15 s (eager on a CPU). Once a row has measured the machine,
    each prediction is ROW_SECONDS + 2 epochs * prior * 10: reference 91 s, fast 20 s."""
    seconds = {"paper": 33.0, "reference": 86.0, "fast": 15.0}
    clock = [0.0]
    monkeypatch.setattr(gpucheck, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def on_train(call, config):
        clock[0] += seconds[config.recipe]

    calls = fake_measurements(monkeypatch, on_train, seconds)
    code, result = check(tmp_path, "--variants", "light", "--budget-seconds", "145")
    assert code == 0 and result["status"] == "finished"
    assert [p["row"] for p in result["plan"]] == LIGHT_ROWS
    # reference/light (91 s) fits the 112 s left after paper, fast/light (20 s) the 26 s
    # left after the pair; then 11 s are left, under the next row's 20 s: it never starts,
    # nor does any after it.
    assert [c.recipe for c in calls] == ["paper", "reference", "fast"]
    assert [s["row"] for s in result["skipped"]] == LIGHT_ROWS[4:]
    assert result["skipped"][0]["why"] == "predicted 20 s, 11 s of the 145 s budget left"


def test_a_pair_is_skipped_whole_when_both_would_not_fit(tmp_path, monkeypatch):
    calls = fake_measurements(monkeypatch)
    monkeypatch.setattr(gpucheck, "PRIOR_EPOCH_SECONDS", {
        **gpucheck.PRIOR_EPOCH_SECONDS, ("reference", "light"): 1e9})
    _, result = check(tmp_path, "--variants", "light", "--budget-seconds", "120")
    ran = {(c.recipe, c.compile_mode, c.cuda_graph) for c in calls}
    assert ("paper", "default", False) not in ran and ("fast", "default", False) in ran
    assert result["skipped"][0]["row"] == "paper/light"
    assert "with reference/light" in result["skipped"][0]["why"]


def test_a_sigterm_leaves_the_file_interrupted_with_every_finished_row(tmp_path, monkeypatch):
    class Killed(Exception):
        pass

    def outer_handler(signum, frame):  # what happened before the check handled SIGTERM
        raise Killed

    def on_train(call, config):
        if call == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(signal, "signal", signal.signal)
    previous = signal.signal(signal.SIGTERM, outer_handler)
    try:
        fake_measurements(monkeypatch, on_train)
        with pytest.raises(SystemExit) as exit_:
            check(tmp_path, "--variants", "light")
        assert signal.getsignal(signal.SIGTERM) is outer_handler  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_.value.code == 128 + signal.SIGTERM
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["status"] == "interrupted" and result["current"] == "reference/light"
    assert [r["row"] for r in result["rows"]] == ["predict", "predict", "paper/light"]


def test_missing_data_is_one_error_line_and_a_failed_file_before_anything_loads(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR10_SOURCE", raising=False)
    loads = []
    monkeypatch.setattr(measure, "load_data", loads.append)
    assert bench.main(["--check", "--variants", "light", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: no training data: copy the training Parquet to .data/train.parquet")
    assert "copy" in err[0] and "--data PATH" in err[0]
    assert loads == []
    (out,) = tmp_path.glob("results-check-*.json")
    result = json.loads(out.read_text())
    assert result["status"] == "failed" and result["error"] == err[0].removeprefix("error: ")
    assert result["rows"] == [] and result["env"]["torch"] == torch.__version__


def test_the_data_is_the_configured_source_else_the_checkouts_data_folder(tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR10_SOURCE", raising=False)
    with pytest.raises(ValueError, match=r"no training data: copy .* to \.data/train\.parquet"):
        gpucheck.find_data()
    (tmp_path / ".data").mkdir()
    (tmp_path / ".data" / "train.parquet").write_bytes(b"")
    assert gpucheck.find_data() == ".data/train.parquet"
    monkeypatch.setenv("CIFAR10_SOURCE", "/data/cifar.parquet")
    assert gpucheck.find_data() == "/data/cifar.parquet"


def test_each_mode_and_variant_set_writes_its_own_file():
    outs = [bench.parse_args(argv).out for argv in (
        ["--check"], ["--check", "--variants", "light"], ["--check", "best"],
        ["--check", "best", "--variants", "deep"], ["--check", "--smoke"])]
    assert outs[0] == "results-check-default-deep-light.json"
    assert outs[3] == "results-check-best-deep.json"
    assert len(set(outs)) == len(outs)


@pytest.mark.slow
def test_the_smoke_check_writes_every_field_of_the_file(tmp_path, narrow_nets):
    code, result = check(tmp_path, "--variants", "light")
    assert code == 0 and result["status"] == "finished" and result["mode"] == "default"
    env = result["env"]
    assert env["device"] and env["peak_bf16_tflops"] is None  # a CPU has no bf16 peak
    assert env["commit"] != "unknown" and "--check --smoke" in env["command"]
    assert env["train_images"] == bench.SMOKE_IMAGES
    train = [r for r in result["rows"] if r["kind"] == "train"]
    assert [r["row"] for r in train] == LIGHT_ROWS[1:]
    for r in train:
        assert r["epochs"] == gpucheck.SMOKE_EPOCHS
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0 and r["images_per_second"] > 0
        assert r["seconds_per_epoch"] == pytest.approx(r["history"][1]["train_seconds"])
        assert r["compiled"] is False and r["recompiles"] == 0 and r["cudagraph_skips"] == 0
        assert set(r["time_to_accuracy"]) == {"0.896", "0.930"}
        assert 0 <= r["val_acc"] <= 1 and r["wall_seconds"] >= r["train_seconds"]
    assert train[2]["val_acc_tta"] is not None and train[0]["val_acc_tta"] is None
    assert [r["batch_size"] for r in train][-4:] == [1024, 1024] + [measure.SMOKE_BATCH] * 2
    predicted = [r for r in result["rows"] if r["kind"] == "predict"]
    assert {r["tta"] for r in predicted} == {False, True}
    assert {t["target"] for t in result["targets"]} == LIGHT_TARGETS
    assert all({"measured", "goal", "met"} <= set(t) for t in result["targets"])


def test_a_check_that_cannot_run_says_why(capsys):
    for argv, message in [(["--check", "--variants", "medium"], "medium: not one of deep"),
                          (["--check", "best", "--best-seconds", "deep=0"], "above 0")]:
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err


def test_best_mode_trains_both_variants_each_to_its_budget_and_prints_the_plan_first(
        tmp_path, monkeypatch, capsys):
    args = bench.parse_args(["--check", "best", "--best-seconds", "light=120"])
    assert args.profile == "full" and args.best_seconds == {"deep": 180.0, "light": 120.0}
    assert args.budget_seconds == 180 + 120 + 2 * gpucheck.ROW_SECONDS + gpucheck.DATA_SECONDS
    steps = gpucheck.plan(args, None, torch.device("cpu"), [])
    assert [(s.name, s.seconds()) for s in steps] == [
        ("fast/deep", 180 + gpucheck.ROW_SECONDS), ("fast/light", 120 + gpucheck.ROW_SECONDS)]

    printed = []
    calls = fake_measurements(monkeypatch, lambda call, config: printed.append(
        capsys.readouterr().err))
    out = tmp_path / "best.json"
    bench.main(["--check", "best", "--smoke", "--variants", "deep,light", "--out", str(out)])
    assert [(c.variant, c.time_budget_seconds, c.cutout) for c in calls] == [
        ("deep", gpucheck.SMOKE_BEST_SECONDS, 12), ("light", gpucheck.SMOKE_BEST_SECONDS, 12)]
    plan = printed[0]  # on stderr before the first row began
    assert plan.startswith("plan: ") and "fast/deep" in plan and "fast/light" in plan
    assert f"~{gpucheck.SMOKE_BEST_SECONDS + gpucheck.ROW_SECONDS:.0f} s" in plan
    result = json.loads(out.read_text())
    assert {t["target"] for t in result["targets"]} == {3}
    assert [p["row"] for p in result["plan"]] == ["fast/deep", "fast/light"]


def test_the_default_plan_runs_the_speed_pairs_before_the_accuracy_rows(monkeypatch):
    calls = fake_measurements(monkeypatch)
    args = bench.parse_args(["--check", "--epochs", "24"])
    steps = gpucheck.plan(args, None, torch.device("cpu"), [])
    assert [(s.name, s.purpose) for s in steps[:7]] == [
        ("predict", "5"), ("paper/deep", "1"), ("reference/deep", "1"),
        ("paper/light", "1"), ("reference/light", "1"),
        ("fast/light", "2, 4"), ("fast/deep", "2, 4")]
    assert [s.name for s in steps[7:]] == [
        "fast/light eager", "fast/deep eager", "fast/light eager b1024",
        "fast/deep eager b1024", "fast/light b1024", "fast/deep b1024",
        "paper/light reduce-overhead", "paper/deep reduce-overhead",
        "paper/light whole-step graph", "paper/deep whole-step graph"]
    assert steps[1].pair is steps[2] and steps[3].pair is steps[4]
    for step in steps[1:]:
        step.run()
    assert [(c.recipe, c.variant, c.epochs, c.batch_size) for c in calls[:6]] == [
        ("paper", "deep", 3, 128), ("reference", "deep", 3, 128),
        ("paper", "light", 3, 128), ("reference", "light", 3, 128),
        ("fast", "light", 24, 512), ("fast", "deep", 24, 512)]
    assert [(c.compile, c.batch_size) for c in calls[6:8]] == [(False, 512)] * 2
    assert [(c.compile, c.batch_size) for c in calls[10:12]] == [(None, 1024)] * 2
    assert [(c.recipe, c.compile_mode, c.cuda_graph) for c in calls[12:]] == [
        ("paper", "reduce-overhead", False)] * 2 + [("paper", "default", True)] * 2
    args = bench.parse_args(["--check"])
    gpucheck.plan(args, None, torch.device("cpu"), [])[5].run()
    assert calls[-1].epochs == gpucheck.FAST_EPOCHS["light"]
