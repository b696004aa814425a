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
                    f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0")
            else:   # CUDA_VISIBLE_DEVICES unset is the common case where the indices agree
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
            return {"gpu_util": float(util.gpu), "gpu_mem_gb": mem.used / 2 ** 30,
                    "gpu_power_w": n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0,
                    "gpu_temp_c": float(n.nvmlDeviceGetTemperature(self.handle, n.NVML_TEMPERATURE_GPU))}
        except Exception:  # noqa: BLE001
            return {}
