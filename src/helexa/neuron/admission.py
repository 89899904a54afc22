"""Per-model admission: a few generations run, a bounded queue waits, the rest get 503."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from helexa.core.errors import ApiError, unavailable


class Abortable(Protocol):
    def abort(self, exc: BaseException) -> None: ...


QUEUED, ADMITTED, GONE, WITHDRAWN = range(4)


class Withdrawn(Exception):
    """The request was taken out of the queue by a cancel (``Admission.withdraw``)."""


@dataclass
class Place:
    """A request's place in a model's queue (``Admission.join``)."""

    waiter: asyncio.Future[None]
    deadline: float  # loop time: the queue timeout counts from joining
    state: int = QUEUED


class Admission:
    def __init__(
        self, *, max_concurrent: int, max_queue: int, timeout_s: float, retry_after_s: int
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False
        self._held: set[Abortable] = set()  # generations holding a slot
        self._cut: str | None = None  # why held generations end now (the drain deadline)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def close(self) -> None:
        """Stop admitting (drain): every queued request is turned away now."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._shutting_down())

    def _shutting_down(self, message: str = "the neuron is shutting down") -> ApiError:
        return unavailable(message, code="shutting_down", retry_after=self.retry_after_s)

    def hold(self, generation: Abortable) -> None:
        """A generation running on a slot this gate gave: ``cut`` ends it."""
        if self._cut is not None:
            generation.abort(self._shutting_down(self._cut))
            return
        self._held.add(generation)

    def drop(self, generation: Abortable) -> None:
        self._held.discard(generation)

    def cut(self, why: str) -> int:
        """The drain deadline: every generation still running ends now with 503
        ``shutting_down`` (an error event on a stream); returns how many there were."""
        self._cut = why
        held, self._held = self._held, set()
        for generation in held:
            generation.abort(self._shutting_down(why))
        return len(held)

    def join(self) -> Place | None:
        """A slot now (None: the caller owns it until it calls ``release()`` once), or a
        place in the bounded queue to ``wait`` on; 503 at once when draining or full. The
        decision is synchronous, so a stream knows before its headers whether it queues."""
        if self._closed:
            raise self._shutting_down()
        if self.in_flight < self.max_concurrent and not self._waiters:
            self.in_flight += 1
            return None
        if len(self._waiters) >= self.max_queue:
            raise unavailable(
                "the model's request queue is full",
                code="queue_full",
                retry_after=self.retry_after_s,
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        return Place(waiter, loop.time() + self.timeout_s)

    async def wait(self, place: Place, poll_s: float | None = None) -> bool:
        """Wait for ``place``'s slot: True once it is the caller's (``release()`` it once);
        False after ``poll_s`` with the request still queued (a stream sends a keep-alive
        and waits on); 503 when the queue timeout passes or the neuron drains."""
        if place.state != QUEUED:
            if place.state == WITHDRAWN:
                raise Withdrawn
            return place.state == ADMITTED
        loop = asyncio.get_running_loop()
        remaining = place.deadline - loop.time()
        step = remaining if poll_s is None else min(poll_s, remaining)
        try:  # asyncio.timeout: wait_for may swallow a racing cancellation on 3.11
            async with asyncio.timeout(max(step, 0.0)):
                await asyncio.shield(place.waiter)
        except TimeoutError:
            if loop.time() < place.deadline:
                return False
            self.leave(place)
            raise unavailable(
                f"waited {self.timeout_s:g}s for a free slot on this model",
                code="queue_timeout",
                retry_after=self.retry_after_s,
            ) from None
        except asyncio.CancelledError:
            self.leave(place)
            raise
        except ApiError:  # turned away by the drain (close)
            place.state = GONE
            raise
        if place.state == WITHDRAWN:
            raise Withdrawn
        place.state = ADMITTED
        return True

    def withdraw(self, place: Place) -> bool:
        """Take a queued request out of the queue for its owner, from outside the task that
        waits (a cancel by request id): its ``wait`` raises ``Withdrawn``. False when it no
        longer waits: admitted (a slot reached it just now: the caller cancels what starts),
        turned away or gone."""
        waiter = place.waiter
        if place.state != QUEUED or waiter.done():
            return False
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        place.state = WITHDRAWN
        waiter.set_result(None)  # wakes the wait, which sees WITHDRAWN (no slot came with it)
        return True

    def leave(self, place: Place) -> None:
        """The request behind ``place`` is gone: out of the queue (a slot that reached it
        just now passes on). Nothing to do once admitted (the holder releases) or gone."""
        if place.state != QUEUED:
            return
        place.state = GONE
        waiter = place.waiter
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.release()  # a slot arrived just as we gave up: pass it on
            return
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if not waiter.done():
            waiter.cancel()

    async def acquire(self) -> None:
        """Take a slot, waiting in the bounded queue; 503 when full, timed out or draining.

        The caller owns the slot until it calls ``release()`` exactly once.
        """
        place = self.join()
        if place is not None:
            await self.wait(place)

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next waiter
                return
        self.in_flight -= 1
