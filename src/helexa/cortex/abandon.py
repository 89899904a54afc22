"""A client that leaves mid-request, and the tokens its request still cost.

Each proxied request gets an id (``x-helexa-request-id``). While the request has not
reached a neuron (routing, a cold load), a client that leaves ends it at once, as before.
Once it has, cortex asks that neuron to cancel it by id (``POST /v1/requests/{id}/cancel``):
the generation stops before its next token and the neuron ends its answer as usual, with
the usage, which the relay reads to the end — sending nothing to the gone client — so the
access log and the token counters have what was really generated. A neuron that cannot
(an older one answering 404, a timeout, a broken connection), or an answer that does not
end within ``SETTLE_S``, is cut as before: the connection closed, the usage known so far.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from starlette.types import Message, Receive, Send

from helexa.core.http import cancel_path, disconnected
from helexa.cortex.upstream import Pool, UpstreamError

log = logging.getLogger("helexa.cortex.proxy")

CANCEL_TIMEOUT_S = 2.0  # the cancel request, connect to answer
SETTLE_S = 5.0  # after the cancel, for the rest of the answer (its usage) to arrive
# Only the neuron's generation routes know request ids (/tokenize just ends).
CANCELLABLE = frozenset({"/v1/chat/completions", "/v1/completions"})


def new_request_id() -> str:
    return secrets.token_hex(16)


async def cancel_on(pool: Pool, request_id: str, timeout: float = CANCEL_TIMEOUT_S) -> bool:
    """Ask the neuron behind ``pool`` to cancel ``request_id``: True when it will (204)."""
    try:
        async with asyncio.timeout(timeout):
            response = await pool.request(
                "POST", cancel_path(request_id), b"", connect_timeout=timeout
            )
            try:
                await response.read(timeout)
            finally:
                response.close()
    except (UpstreamError, TimeoutError) as exc:
        log.info("cancel failed", extra={"request_id": request_id, "error": str(exc) or "timeout"})
        return False
    if response.status != 204:  # 404: finished already, or a neuron without the route
        log.info("cancel failed", extra={"request_id": request_id, "status": response.status})
        return False
    return True


class ClientWatch:
    """Watches the client of one proxied request, from one task beside the request's.

    ``neuron`` is where the request is in flight, (pool, request id), once it is sent; the
    relay sends to the client through ``send``, which drops everything once it has gone.
    When the watch ends the request's task, ``left()`` tells the ``CancelledError`` apart
    from any other cancellation."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._send = send
        self.gone = False  # the client disconnected before its answer was complete
        self.neuron: tuple[Pool, str] | None = None
        self._answered = False  # the last byte went out: the disconnect that follows is normal
        self._cut = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        await disconnected(receive)
        if self._answered:
            return
        self.gone = True
        neuron = self.neuron
        if neuron is not None and await cancel_on(*neuron):
            await asyncio.sleep(SETTLE_S)  # the relay reads on; it ends this watch first
        self._cut = True
        self._task.cancel()

    async def send(self, message: Message) -> None:
        if self.gone:
            return
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self._answered = True
        await self._send(message)

    def answered(self) -> None:
        """The client has had its whole answer, though the body has not ended yet (a stream
        past its [DONE]): leaving now is not abandoning it."""
        self._answered = True

    def left(self) -> bool:
        """In the request's task, on ``CancelledError``: whether this watch alone cut it
        (the client left); then the cancellation is taken back."""
        return self._cut and self._task.uncancel() == 0

    def close(self) -> None:
        self._watcher.cancel()
