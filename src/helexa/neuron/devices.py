"""The host's devices and the worker thread that owns each one."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from helexa.core.errors import ApiError, bad_request
from helexa.neuron.device_thread import DeviceWorker

log = logging.getLogger("helexa.neuron.devices")

CPU = "cpu"
MB = 1024 * 1024


@dataclass(frozen=True)
class DeviceSlot:
    key: str  # "cpu" or "cuda:N"
    index: int | None  # CUDA index; None for the CPU


def cuda_key(index: int) -> str:
    return f"cuda:{index}"


class DevicePool:
    """One ``DeviceWorker`` per CUDA device (``cuda-dev-N``) plus one for the CPU, and the
    memory bookkeeping every harness places against: the CPU budget, what each harness has
    loaded there, and bytes reserved by loads in progress (any harness, any device)."""

    def __init__(
        self,
        cuda_indices: list[int],
        *,
        cpu_threads: int | None = None,
        cpu_budget_bytes: int = 0,
    ) -> None:
        self.cuda_indices = list(cuda_indices)
        self.cpu_budget_bytes = cpu_budget_bytes
        self.reserved: dict[str, int] = {}  # device key -> bytes of loads in progress
        # device key -> bytes held outside this pool: lent to other hosts, or (in a worker
        # process) held by the host's other workers, as the neuron told it before a load.
        self.outside: Callable[[str], int] = lambda _key: 0
        self._usage: list[Callable[[str], int]] = []
        self._workers: dict[str, DeviceWorker] = {}
        for index in self.cuda_indices:
            self._workers[cuda_key(index)] = DeviceWorker(
                f"cuda-dev-{index}", on_start=_select_cuda(index)
            )
        self._workers[CPU] = DeviceWorker("cpu", on_start=_cpu_setup(cpu_threads))

    def start(self) -> None:
        for worker in self._workers.values():
            worker.start()

    def stop(self) -> None:
        for worker in self._workers.values():
            worker.stop()

    def worker(self, key: str) -> DeviceWorker:
        return self._workers[key]

    def track(self, memory_used: Callable[[str], int]) -> None:
        """Count a harness's loaded bytes (per device key) against the CPU budget."""
        self._usage.append(memory_used)

    def cpu_used(self) -> int:
        return sum(used(CPU) for used in self._usage)

    async def free_bytes(self, key: str) -> int:
        """Free memory on a device, before reservations: the CPU budget left, or what CUDA
        reports (asked on the device's own worker)."""
        if key == CPU:
            return self.cpu_budget_bytes - self.cpu_used()
        import torch

        index = int(key.split(":")[1])
        free, _total = await asyncio.wrap_future(
            self.worker(key).submit(torch.cuda.mem_get_info, index)
        )
        return int(free)

    async def capacity_bytes(self, key: str) -> int:
        """All the memory a device could ever give models: the CPU budget, or the card's
        total (asked on its worker)."""
        if key == CPU:
            return self.cpu_budget_bytes
        import torch

        index = int(key.split(":")[1])
        _free, total = await asyncio.wrap_future(
            self.worker(key).submit(torch.cuda.mem_get_info, index)
        )
        return int(total)

    async def room(self, keys: list[str]) -> dict[str, int]:
        """Free bytes minus reservations, per key. Callers reserve what they take before
        their next await, so concurrent placements see each other without a lock."""
        free = {key: await self.free_bytes(key) for key in keys}
        return {key: free[key] - self.reserved.get(key, 0) - self.outside(key) for key in keys}

    def reserve(self, key: str, size: int) -> None:
        self.reserved[key] = self.reserved.get(key, 0) + size

    def unreserve(self, key: str, size: int) -> None:
        self.reserved[key] = self.reserved.get(key, 0) - size


def candidates(
    devices: Sequence[int] | None, tensor_parallel: int | None, cuda_indices: Sequence[int]
) -> list[str]:
    """Device keys a load spec allows a whole model on: ``devices: []`` the CPU, ``[i]`` that
    GPU, unset every GPU (the CPU on a host without one). A spec that splits the model over
    several devices is refused: a model lives on one device (and in one worker process)."""
    if (tensor_parallel or 1) > 1 or (devices and len(devices) > 1):
        raise bad_request(
            "a model is placed on exactly one device: tensor_parallel and multi-device "
            "placement are not supported (load it with devices: [i], or a quant that fits "
            "one card)",
            param="devices",
            code="unsupported_placement",
        )
    if devices == []:
        return [CPU]
    if devices:
        index = devices[0]
        if index not in cuda_indices:
            raise bad_request(
                f"no CUDA device {index} on this host (have {list(cuda_indices)}); "
                "devices: [] is the CPU",
                param="devices",
                code="no_such_device",
            )
        return [cuda_key(index)]
    return [cuda_key(i) for i in cuda_indices] or [CPU]


def model_too_large(need: int, most: int, where: str) -> ApiError:
    """400 ``model_too_large``: more than ``where`` could hold with nothing else loaded, so
    no retry, eviction or wait helps on this neuron (unlike 409 ``insufficient_memory``)."""
    hint = "raise [cpu] memory_mb or " if where == CPU else ""
    return ApiError(
        400,
        f"the model needs ~{need // MB} MB, more than {where} can ever hold on this neuron "
        f"({most // MB} MB with nothing else loaded): {hint}pick a smaller model or quant, "
        "or another host",
        code="model_too_large",
        param="model_id",
    )


def _select_cuda(index: int):  # type: ignore[no-untyped-def]
    def start() -> None:
        import torch

        torch.cuda.set_device(index)

    return start


def _cpu_setup(threads: int | None):  # type: ignore[no-untyped-def]
    def start() -> None:
        # torch's thread count matters only where torch runs models: a llamacpp-only neuron
        # never imports it (the transformers harness imports it before the workers start).
        if threads and "torch" in sys.modules:
            import torch

            torch.set_num_threads(threads)

    return start
