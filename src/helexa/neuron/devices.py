"""The host's devices and the worker thread that owns each one."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from helexa.neuron.workers import DeviceWorker

log = logging.getLogger("helexa.neuron.devices")

CPU = "cpu"


@dataclass(frozen=True)
class DeviceSlot:
    key: str  # "cpu" or "cuda:N"
    index: int | None  # CUDA index; None for the CPU


def cuda_key(index: int) -> str:
    return f"cuda:{index}"


class DevicePool:
    """One ``DeviceWorker`` per CUDA device (``cuda-dev-N``) plus one for the CPU."""

    def __init__(self, cuda_indices: list[int], *, cpu_threads: int | None = None) -> None:
        self.cuda_indices = list(cuda_indices)
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


def _select_cuda(index: int):  # type: ignore[no-untyped-def]
    def start() -> None:
        import torch

        torch.cuda.set_device(index)

    return start


def _cpu_setup(threads: int | None):  # type: ignore[no-untyped-def]
    def start() -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)

    return start
