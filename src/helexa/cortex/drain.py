"""cortex's own SIGTERM: stop accepting, let what is in flight finish up to
``gateway.drain_timeout_s``, then end the rest cleanly.

uvicorn stops accepting (it closes the listener and idle connections) and waits for the
connections left; left to itself it would cancel them at its deadline, cutting a stream's
chunked body short (no ``[DONE]``, ``message_stop`` or error event). So cortex's deadline
comes first (uvicorn's is ``CUT_GRACE_S`` later): every stream still relayed has its
upstream aborted with ``GatewayShutdown``, and the relay ends it the way it ends any
broken stream — an error event in the client's protocol, then the end of the body; a
request still being routed (waiting for a cold load, or for a neuron's answer to begin)
gets a 503 ``shutting_down`` in its route's envelope.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from helexa.core.errors import ApiError, unavailable
from helexa.cortex.upstream import GatewayShutdown, Response

log = logging.getLogger("helexa.cortex.drain")

T = TypeVar("T")

# uvicorn's own graceful-shutdown limit is the drain deadline plus this: time for the cut
# streams to send their error events before uvicorn cancels what is left (the backstop).
CUT_GRACE_S = 5.0


class Drain:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self.cut = False
        self._relays: set[Response] = set()  # upstream answers being relayed to clients
        self._routing: set[asyncio.Task[object]] = set()  # requests not yet answered
        self._cancelled: set[asyncio.Task[object]] = set()  # routing ones the cut cancelled

    @property
    def reason(self) -> str:
        return (
            f"cortex is shutting down: its drain deadline ({self.timeout_s:g}s) ended this "
            "request; retry it"
        )

    def error(self) -> ApiError:
        return unavailable(self.reason, code="shutting_down", retry_after=1)

    def begin(self) -> None:
        """SIGTERM: uvicorn stops accepting; the cut is armed."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(self.timeout_s, self.cut_all)
        log.info(
            "drain started",
            extra={"in_flight": len(self._relays) + len(self._routing), "secs": self.timeout_s},
        )

    def cut_all(self) -> None:
        """The deadline: end every relay and every request still being routed, now."""
        self.cut = True
        relays, routing = list(self._relays), list(self._routing)
        for upstream in relays:
            upstream.abort(GatewayShutdown(self.reason))
        for task in routing:
            self._cancelled.add(task)
            task.cancel()
        if relays or routing:
            log.warning(
                "drain deadline: requests cut",
                extra={"streams": len(relays), "routing": len(routing)},
            )

    async def routing(self, work: Coroutine[Any, Any, T]) -> T:
        """Await ``work`` (routing and sending a request) in this task; the cut turns it
        into a 503 ``shutting_down`` (other cancellations pass through)."""
        if self.cut:
            work.close()  # never started
            raise self.error()
        task: asyncio.Task[object] = asyncio.current_task()  # type: ignore[assignment]
        self._routing.add(task)
        try:
            return await work
        except asyncio.CancelledError:
            if task in self._cancelled and task.uncancel() == 0:
                raise self.error() from None
            raise
        finally:
            self._routing.discard(task)
            self._cancelled.discard(task)

    def relaying(self, upstream: Response) -> None:
        """``upstream`` is being relayed: the cut aborts it (``GatewayShutdown``)."""
        if self.cut:
            upstream.abort(GatewayShutdown(self.reason))
        self._relays.add(upstream)

    def relayed(self, upstream: Response) -> None:
        self._relays.discard(upstream)
