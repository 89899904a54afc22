"""Running a Starlette app under uvicorn with a drain hook and a clean exit status."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("helexa.serving")


def uvicorn_config(
    app: Any, host: str, port: int, *, drain_timeout_s: float, **extra: Any
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(max(drain_timeout_s, 1)),
        timeout_keep_alive=30,
        **extra,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: ``on_drain`` when SIGTERM/SIGINT arrives, ``on_bound`` after bind,
    and exit status 0 after a graceful stop (uvicorn would re-raise the signal)."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_drain: Callable[[], None],
        on_bound: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._on_bound = on_bound
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self._on_bound is not None:
            self._on_bound()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a drained stop is a clean exit: status 0
        if first:
            log.info("signal received: draining", extra={"signal": sig})
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_drain)
