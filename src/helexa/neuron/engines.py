"""Where the neuron's engines run: in a worker process per device (``WorkerEngines``, what
``neuron serve`` uses), or in this process (``LocalEngines``: what each worker runs inside,
and what tests use to reach engine internals). The neuron sees the same ``Harness``es."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from helexa.core.wire import WorkerHealth
from helexa.neuron.config import NeuronSettings
from helexa.neuron.devices import CPU, DevicePool
from helexa.neuron.discovery import Hardware
from helexa.neuron.harness.base import Harness
from helexa.neuron.harness.registry import build_harnesses, configured
from helexa.neuron.worker.harness import WorkerHarness
from helexa.neuron.worker.supervisor import Workers


class Engines(Protocol):
    harnesses: dict[str, Harness]

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def closing(self) -> None:
        """The neuron is draining: what is unloaded now is not replaced by a fresh worker."""
        ...

    def cpu_used(self) -> int: ...

    def workers(self) -> list[WorkerHealth]: ...

    def count_lent(self, lent: Callable[[str], int]) -> None:
        """Loads count ``lent(device key)`` bytes as taken (lent to other hosts)."""
        ...

    async def recycle(self, device: str | None) -> list[str]:
        """Recycle idle workers (``device``: that one only), their models reloaded before
        this returns; the devices recycled."""
        ...


class WorkerEngines:
    def __init__(self, settings: NeuronSettings, hardware: Hardware, cpu_budget: int) -> None:
        self.hardware = hardware
        self.supervisor = Workers(
            settings,
            configured(settings),
            [d.index for d in hardware.devices],
            cpu_budget,
        )
        self.harnesses: dict[str, Harness] = {
            name: WorkerHarness(name, self.supervisor, self._free_mb)
            for name in self.supervisor.engines
        }

    def _free_mb(self) -> dict[str, int]:
        return {f"cuda:{d.index}": d.vram_free_mb for d in self.hardware.device_health()}

    def start(self) -> None:
        self.supervisor.start()

    async def stop(self) -> None:
        await self.supervisor.stop()

    def closing(self) -> None:
        self.supervisor.closing = True

    def cpu_used(self) -> int:
        return sum(h.memory_used_bytes(CPU) for h in self.harnesses.values())

    def workers(self) -> list[WorkerHealth]:
        return self.supervisor.health()

    def count_lent(self, lent: Callable[[str], int]) -> None:
        self.supervisor.lent = lent

    async def recycle(self, device: str | None) -> list[str]:
        keys = [device] if device is not None else list(self.supervisor.devices)
        done = []
        for key in keys:
            if key in self.supervisor.devices and await self.supervisor.recycle(
                key, why="asked (defrag)"
            ):
                done.append(key)
        for key in done:
            await self.supervisor.settled(key)
        return done


class LocalEngines:
    def __init__(self, settings: NeuronSettings, hardware: Hardware, cpu_budget: int) -> None:
        self.pool = DevicePool(
            _cuda_indices(hardware), cpu_threads=settings.cpu.threads, cpu_budget_bytes=cpu_budget
        )
        self.harnesses = build_harnesses(settings, self.pool)

    def start(self) -> None:
        self.pool.start()

    async def stop(self) -> None:
        self.pool.stop()

    def closing(self) -> None:
        pass

    def cpu_used(self) -> int:
        return self.pool.cpu_used()

    def workers(self) -> list[WorkerHealth]:
        return []

    def count_lent(self, lent: Callable[[str], int]) -> None:
        self.pool.outside = lent

    async def recycle(self, device: str | None) -> list[str]:
        return []


def _cuda_indices(hardware: Hardware) -> list[int]:
    if not hardware.devices:
        return []
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
