"""The compile gate: a few builds at a time, a short queue, then a 503 to retry."""

from __future__ import annotations

import asyncio
import threading

import pytest

from helexa.core.errors import ApiError
from helexa.neuron.harness.compile_gate import CompileGate


def test_builds_run_a_few_at_a_time_and_a_full_queue_is_a_503() -> None:
    async def scenario() -> None:
        gate = CompileGate(running=1, waiting=2)
        release = threading.Event()
        running = asyncio.create_task(gate.run(release.wait, 10))
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(gate.run(lambda: "done")) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as info:
            await gate.run(lambda: "too many")
        assert info.value.status == 503 and info.value.code == "schema_queue_full"
        assert info.value.headers.get("Retry-After") == "1"
        release.set()
        assert await running is True
        assert [await task for task in queued] == ["done", "done"]
        assert await gate.run(lambda: "again") == "again"  # room once the queue drained

    asyncio.run(scenario())
