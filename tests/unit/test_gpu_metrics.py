"""The per-run GPU metrics: the run's own GPU, found by UUID; nothing on a CPU."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import torch

from tasks import gpu


def test_on_a_cpu_there_are_no_gpu_metrics():
    assert gpu.Monitor("cpu").sample() == {}


def test_the_runs_own_gpu_is_sampled_by_its_uuid(monkeypatch):
    """NVML sees every GPU of the machine whatever CUDA_VISIBLE_DEVICES says; the monitor
    must ask for the one torch runs on (cuda:1 here), by its UUID."""
    asked = []
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByUUID = lambda uuid: asked.append(uuid) or uuid
    fake.nvmlDeviceGetUtilizationRates = lambda handle: SimpleNamespace(gpu=87)
    fake.nvmlDeviceGetMemoryInfo = lambda handle: SimpleNamespace(used=3 * 2**30)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gpu, "resolve_device", lambda name: torch.device("cuda", 1))
    uuids = {0: "aaaa-0000", 1: "bbbb-1111"}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(uuid=uuids[index]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 2**30)

    sample = gpu.Monitor("cuda:1").sample()
    assert asked == ["GPU-bbbb-1111"]
    assert sample == {"gpu/utilization_percent": 87.0, "gpu/memory_used_gib": 3.0,
                      "gpu/max_allocated_gib": 1.0}


def test_a_machine_without_nvml_trains_without_gpu_metrics(monkeypatch, caplog):
    fake = types.ModuleType("pynvml")

    def no_library():
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    fake.nvmlInit = no_library
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gpu, "resolve_device", lambda name: torch.device("cuda", 0))
    monitor = gpu.Monitor("cuda")
    assert monitor.sample() == {}
    assert "libnvidia-ml" in caplog.text
