"""Hardware discovery and live readings: GPUs through NVML (nvidia-ml-py), CPU from the OS."""

from __future__ import annotations

import logging
import os
import platform
import socket
from pathlib import Path
from typing import Any

from helexa.core.wire import CpuInfo, DeviceHealth, DeviceInfo, Discovery

log = logging.getLogger("helexa.neuron.discovery")

MB = 1024 * 1024


def _nvml() -> Any | None:
    """The initialised pynvml module, or None on a host without an NVIDIA driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver, no devices
        log.info("no NVML: CPU-only host", extra={"reason": str(exc) or type(exc).__name__})
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class Hardware:
    """What the host has (discovered once) and how it is doing (read on demand)."""

    def __init__(self) -> None:
        self._nvml = _nvml()
        self.devices: list[DeviceInfo] = []
        self.cuda_version: str | None = None
        self.driver_version: str | None = None
        if self._nvml is not None:
            self._discover_gpus()

    def _discover_gpus(self) -> None:
        nv = self._nvml
        assert nv is not None
        self.driver_version = _text(nv.nvmlSystemGetDriverVersion())
        cuda = nv.nvmlSystemGetCudaDriverVersion_v2()
        self.cuda_version = f"{cuda // 1000}.{(cuda % 1000) // 10}"
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            try:
                major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
                capability: str | None = f"{major}.{minor}"
            except Exception:
                capability = None
            self.devices.append(
                DeviceInfo(
                    index=index,
                    name=_text(nv.nvmlDeviceGetName(handle)),
                    vram_total_mb=int(nv.nvmlDeviceGetMemoryInfo(handle).total // MB),
                    compute_capability=capability,
                )
            )

    def discovery(self, harnesses: list[str]) -> Discovery:
        return Discovery(
            hostname=socket.gethostname(),
            os=os_name(),
            kernel=platform.release(),
            cuda_version=self.cuda_version,
            driver_version=self.driver_version,
            devices=self.devices,
            cpu=CpuInfo(cores=os.cpu_count() or 1, memory_total_mb=total_memory_bytes() // MB),
            harnesses=harnesses,
        )

    def process_memory_mb(self, index: int, pid: int) -> int:
        """MB of GPU ``index`` that process ``pid`` holds (0 where NVML cannot say)."""
        nv = self._nvml
        if nv is None:
            return 0
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            running = nv.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:  # an NVML error: count the loan whole, the safe side
            return 0
        used = sum(p.usedGpuMemory or 0 for p in running if p.pid == pid)
        return int(used // MB)

    def device_health(self) -> list[DeviceHealth]:
        nv = self._nvml
        if nv is None:
            return []
        readings = []
        for device in self.devices:
            handle = nv.nvmlDeviceGetHandleByIndex(device.index)
            memory = nv.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization: int | None = int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:
                utilization = None
            try:
                temp: int | None = int(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
            except Exception:
                temp = None
            readings.append(
                DeviceHealth(
                    index=device.index,
                    vram_used_mb=int(memory.used // MB),
                    vram_free_mb=int(memory.free // MB),
                    utilization_pct=utilization,
                    temp_c=temp,
                )
            )
        return readings
