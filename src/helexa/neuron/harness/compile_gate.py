"""Where response_format grammars are built: in threads, a few at a time, with a short queue.

A parse runs to its end once started (threads cannot be cancelled), so the gate bounds how
many run at once (they would take every executor thread and core from the loads and requests
beside them) and how many may wait: beyond that a new schema is a 503 to retry, not an
ever-longer wait that holds up the cheap schemas behind it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from helexa.core.errors import unavailable

T = TypeVar("T")

RUNNING = 2
WAITING = 8


class CompileGate:
    def __init__(self, running: int = RUNNING, waiting: int = WAITING) -> None:
        self._slots = asyncio.Semaphore(running)
        self._waiting_limit = waiting
        self._waiting = 0

    async def run(self, build: Callable[..., T], *args: object) -> T:
        if self._slots.locked() and self._waiting >= self._waiting_limit:
            raise unavailable(
                f"{self._waiting} response_format schemas are waiting to be compiled on this "
                "model's harness; try again shortly",
                code="schema_queue_full",
                retry_after=1,
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            return await asyncio.to_thread(build, *args)
        finally:
            self._slots.release()
