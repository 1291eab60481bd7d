"""Local dispatch on a machine with several GPUs: one job at a time per device, the
devices side by side. Training is replaced by a task that records when it ran where."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from prefect import flow, task

import flows.train
from model.config import TrainConfig
from tasks.training import VariantJob, VariantResult

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _jobs(count: int) -> list[VariantJob]:
    return [VariantJob(training=TrainConfig(variant="light", seed=seed), run_key="k")
            for seed in range(count)]


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, float, float]]:
    """Pretend two GPUs; each job holds its device 0.3 s. Seed 1 fails."""
    recorded: list[tuple[str, int, float, float]] = []
    lock = threading.Lock()

    @task
    def fake_fit_and_register(job: VariantJob, data, settings, should_stop=None) -> VariantResult:
        start = time.monotonic()
        time.sleep(0.3)
        with lock:
            recorded.append((job.training.device, job.training.seed, start, time.monotonic()))
        if job.training.seed == 1:
            raise RuntimeError("diverged")
        return VariantResult(variant="light", seed=job.training.seed, recipe="fast",
                             run_id="r", version=str(job.training.seed),
                             metrics={"val/acc": 0.5})

    monkeypatch.setattr(flows.train, "fit_and_register", fake_fit_and_register)
    monkeypatch.setattr(flows.train.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(flows.train.torch.cuda, "device_count", lambda: 2)
    return recorded


def test_each_gpu_runs_one_job_at_a_time_and_the_gpus_run_side_by_side(spans) -> None:
    @flow
    def dispatch() -> tuple:
        return flows.train._run_here(_jobs(5), None, None)

    results, failed = dispatch()
    assert sorted(r.seed for r in results) == [0, 2, 3, 4]
    assert list(failed) == ["light-seed1"] and "diverged" in failed["light-seed1"]
    # Seeds 0, 2, 4 on cuda:0 and 1, 3 on cuda:1; the failure of seed 1 did not stop seed 3.
    by_device: dict[str, list] = {}
    for device, seed, start, end in spans:
        by_device.setdefault(device, []).append((start, end, seed))
    assert {d: sorted(s for *_, s in v) for d, v in by_device.items()} == {
        "cuda:0": [0, 2, 4], "cuda:1": [1, 3]}
    for runs in by_device.values():
        runs.sort()
        for (_, end, _), (start, _, _) in itertools.pairwise(runs):
            assert start >= end, "two jobs shared a GPU"
    # Side by side: the first job of each device started before the other one ended.
    (first0, end0, _), (first1, end1, _) = by_device["cuda:0"][0], by_device["cuda:1"][0]
    assert first0 < end1 and first1 < end0
