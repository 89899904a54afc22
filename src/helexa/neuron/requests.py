"""Inference requests in progress on this neuron, by the id cortex gives each one
(``x-helexa-request-id``), so that ``POST /v1/requests/{id}/cancel`` can end one: its
generation stops before its next token (or it leaves the queue) and its answer ends as
usual — a stream with its last chunks, usage and ``[DONE]``, a whole answer with its usage —
so cortex, whose own client left, learns exactly how many tokens were generated."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from helexa.neuron.access import Accounting
from helexa.neuron.harness.base import TokenStream

log = logging.getLogger("helexa.neuron.requests")

# How long an answer that is over (the client left, a drain cut it) waits for its cancelled
# generation to stop, for the exact count: one token step, unless the device is stuck.
SETTLE_S = 3.0

_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def request_id_of(value: str | None) -> str | None:
    """The request id a header carries, if it is one (cortex sends 32 hex digits)."""
    return value if value is not None and _REQUEST_ID.fullmatch(value) else None


class Running:
    """One inference request from its start to the end of its answer: what a cancel ends,
    and the access log's record of it."""

    def __init__(self, record: Accounting, on_end: Callable[[Running], None] | None = None):
        self.record = record
        self.cancelled = False
        self.stream: TokenStream | None = None
        self._withdraw: Callable[[], object] | None = None
        self._on_end = on_end

    @property
    def request_id(self) -> str | None:
        return self.record.request_id

    def queued(self, withdraw: Callable[[], object]) -> None:
        """Waiting for a slot; ``withdraw`` takes it out of the queue (``Withdrawn``)."""
        self._withdraw = withdraw
        if self.cancelled:
            withdraw()

    def started(self, stream: TokenStream) -> None:
        self._withdraw = None
        self.stream = stream
        if self.cancelled:  # cancelled while it was being admitted: it stops at once
            stream.cancel()

    def left(self) -> None:
        """The client disconnected (the caller stops the generation)."""
        self.record.abandoned = True

    def failed(self, code: str | None) -> None:
        """A stream ended in an error event (its head said 200)."""
        self.record.error = code or "error"

    def cancel(self) -> None:
        """Cancelled by id: the generation stops (or never starts) and the answer ends
        normally with what was made; logged as abandoned."""
        self.cancelled = True
        self.record.abandoned = True
        if self.stream is not None:
            self.stream.cancel()
        elif self._withdraw is not None:
            self._withdraw()

    async def settle(self, timeout: float = SETTLE_S) -> None:
        """Put the tokens generated in the record; a generation cut short (client gone,
        drain) is waited for, at most ``timeout``, so the count is exact."""
        stream = self.stream
        if stream is None:
            return  # never started: the zero set at the start stands
        finish = stream.finish or await stream.settled(timeout)
        if finish is None:
            self.record.completion_tokens = None  # failed, or the device never said
            return
        self.record.prompt_tokens = finish.prompt_tokens
        self.record.completion_tokens = finish.completion_tokens

    def end(self) -> None:
        """The answer is over (idempotent): no longer cancellable."""
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self)


class Requests:
    """The registry: ids of inference requests whose answers are not over yet."""

    def __init__(self) -> None:
        self._by_id: dict[str, Running] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, request_id: str | None, record: Accounting) -> Running:
        """A request begins; one without an id (or reusing a running one's) is not
        cancellable by id, but is accounted for all the same."""
        record.request_id = request_id
        if request_id is None or request_id in self._by_id:
            return Running(record)
        running = Running(record, self._forget)
        self._by_id[request_id] = running
        return running

    def _forget(self, running: Running) -> None:
        assert running.request_id is not None
        if self._by_id.get(running.request_id) is running:
            del self._by_id[running.request_id]

    def cancel(self, request_id: str) -> bool:
        """False when no such request is running (unknown, or its answer is over)."""
        running = self._by_id.get(request_id)
        if running is None:
            return False
        running.cancel()
        return True
