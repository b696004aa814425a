"""GPU telemetry through NVML (pynvml, from nvidia-ml-py): utilisation, memory, power, temperature.

`GpuTelemetry(device).sample()` reads the rank's own GPU; on a machine without a GPU or without a
working NVML it returns {} and never raises, so CPU runs and tests are unaffected.
"""

from __future__ import annotations

import torch


class GpuTelemetry:
    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(device)
            bus = getattr(props, "pci_bus_id", None)
            if bus is not None:
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(
                    f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
                )
            else:  # CUDA_VISIBLE_DEVICES unset is the common case where the indices agree
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.nvml = pynvml
        except Exception:  # noqa: BLE001 - telemetry is best effort, never a reason to fail a run
            self.handle = None

    def sample(self) -> dict:
        if self.handle is None:
            return {}
        n = self.nvml
        try:
            util = n.nvmlDeviceGetUtilizationRates(self.handle)
            mem = n.nvmlDeviceGetMemoryInfo(self.handle)
            return {
                "gpu_util": float(util.gpu),
                "gpu_mem_gb": mem.used / 2**30,
                "gpu_power_w": n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
                "gpu_temp_c": float(n.nvmlDeviceGetTemperature(self.handle, n.NVML_TEMPERATURE_GPU)),
            }
        except Exception:  # noqa: BLE001
            return {}


class StepTimer:
    """Where a training step's time goes: data wait, host->device copy, forward, loss, backward,
    optimizer. Only every `every`-th step is timed, with the device synchronised at each phase
    boundary (the other steps run unsynchronised, at full speed); 0 turns it off. Peak device
    memory of the sampled step is recorded on GPUs."""

    PHASES = ("data", "h2d", "forward", "loss", "backward", "optimizer")

    def __init__(self, device: torch.device, every: int, clock=None):
        import time

        self.device, self.every, self.clock = device, every, clock or time.perf_counter
        self.active, self.row, self.t = False, {}, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, step: int) -> None:
        """Before waiting for the batch of optimizer step `step` (1-based)."""
        self.active = self.every > 0 and step % self.every == 0
        if self.active:
            self._sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.row, self.t = {}, self.clock()

    def mark(self, phase: str) -> None:
        if self.active:
            self._sync()
            now = self.clock()
            self.row[f"{phase}_ms"] = 1000.0 * (now - self.t)
            self.t = now

    def end(self) -> dict | None:
        """The sampled step's phases (ms) and their total, or None if this step was not sampled."""
        if not self.active or len(self.row) != len(self.PHASES):
            return None
        row = dict(self.row)
        row["step_ms"] = sum(row.values())
        if self.device.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.active = False
        return row
