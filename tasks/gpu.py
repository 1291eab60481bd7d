"""Utilisation and memory of the run's own GPU, sampled once per epoch for MLflow.

MLflow's system metrics report every GPU NVML sees, and NVML ignores
CUDA_VISIBLE_DEVICES: a worker given one GPU of eight would log all eight. Here the GPU is
found by the UUID torch reports for the run's device, so each run logs its own.
"""

from __future__ import annotations

import logging

import torch

from model.predict import resolve_device

log = logging.getLogger(__name__)


class Monitor:
    """`sample()` -> {"gpu/utilization_percent", "gpu/memory_used_gib",
    "gpu/max_allocated_gib"} for the run's device; {} on a CPU or without nvidia-ml-py."""

    def __init__(self, device: str = "auto"):
        self.device = resolve_device(device)
        self.handle, self.nvml = None, None
        if self.device.type != "cuda":
            return
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            index = self.device.index if self.device.index is not None else 0
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            # torch prints a bare UUID; NVML wants it with its "GPU-" prefix.
            uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self.nvml = pynvml
        except Exception as exc:  # no driver library, an old driver: metrics are optional
            log.warning("no GPU metrics for %s: %s: %s", self.device, type(exc).__name__, exc)

    def sample(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        try:
            use = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        except Exception as exc:
            log.warning("reading GPU metrics failed: %s", exc)
            return {}
        return {
            "gpu/utilization_percent": float(use.gpu),
            "gpu/memory_used_gib": memory.used / 2**30,
            "gpu/max_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
        }
