"""Getting a request to a neuron and accounting for it: routing, one retry before the
first byte, in-flight counts, metrics. Shared by every proxied route."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from helexa.core.errors import ApiError, unavailable
from helexa.cortex.fleet import Fleet, NeuronState
from helexa.cortex.metrics import Metrics
from helexa.cortex.router import Router
from helexa.cortex.upstream import LocalExhaustion, Response, UpstreamError, UpstreamTimeout

log = logging.getLogger("helexa.cortex.proxy")


@dataclass
class Call:
    """One request in flight on one neuron."""

    state: NeuronState
    upstream: Response
    model_id: str
    started: float

    @property
    def node(self) -> str:
        return self.state.name


class Dispatcher:
    def __init__(self, router: Router, fleet: Fleet, metrics: Metrics) -> None:
        self.router = router
        self.fleet = fleet
        self.metrics = metrics
        self.idle_timeout = router.settings.proxy.idle_timeout_s
        self.connect_timeout = router.settings.proxy.connect_timeout_s
        self.generation_timeout = router.settings.proxy.generation_timeout_s

    async def open(
        self,
        model_id: str,
        path: str,
        payload: bytes,
        *,
        stream: bool,
        affinity: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        tried: Callable[[NeuronState], None] | None = None,
    ) -> Call:
        """Route and send; a neuron that fails before its first byte (unreachable, seen
        dead by the poller, or draining) is reported and the request retried once
        elsewhere. ``tried`` hears each neuron the request is sent to, so an error (a
        timeout waiting for the answer's head) is logged and counted against its node, and
        a client that leaves can have it cancelled there; it may raise to stop a retry.
        Raises ApiError (counted by the access layer)."""
        started = time.monotonic()
        failed: set[str] = set()  # neurons that broke: routed around on the retry
        attempts = 0
        while True:
            state = await self.router.route(model_id, frozenset(failed), affinity)
            attempts += 1
            if tried is not None:
                tried(state)
            state.begin_request(model_id)
            try:
                upstream = await state.pool.request(
                    "POST",
                    path,
                    payload,
                    headers=headers,
                    connect_timeout=self.connect_timeout,
                    header_timeout=self.idle_timeout if stream else self.generation_timeout,
                )
            except BaseException as exc:
                self._release(state, model_id)
                if not isinstance(exc, UpstreamError):
                    raise  # cancelled (the client left): counted out, nothing to retry
                if isinstance(exc, LocalExhaustion):  # our file descriptors, not the neuron
                    log.error("out of connections", extra={"error": str(exc)})
                    raise unavailable(
                        f"cortex cannot open more connections: {exc}",
                        code="gateway_overloaded",
                        retry_after=1,
                    ) from exc
                if isinstance(exc, UpstreamTimeout):  # sent and maybe running: no retry
                    raise unavailable(
                        f"neuron {state.name} did not answer: {exc}",
                        code="upstream_timeout",
                        retry_after=5,
                    ) from exc
                failed.add(state.name)
                self.fleet.report_failure(state, exc)
                self.metrics.error(model_id, state.name, "upstream_connect")
                if attempts >= 2:
                    raise unavailable(
                        f"neuron {state.name} failed: {exc}",
                        code="upstream_unavailable",
                        retry_after=1,
                    ) from exc
                log.info("retry on another neuron", extra={"model": model_id, "failed": state.name})
                continue
            if upstream.status == 503 and attempts < 2:
                try:
                    raw = await self._peek(upstream)
                except BaseException:  # cancelled (the client left) while reading it
                    upstream.close()
                    self._release(state, model_id)
                    raise
                reason = elsewhere(raw)
                if reason is not None:  # this neuron cannot serve it now; another may
                    upstream.close()
                    self._release(state, model_id)
                    if reason == "draining":
                        state.saw_draining()
                    else:
                        state.engine_crashed(model_id)
                    failed.add(state.name)
                    log.info(
                        "retry on another neuron",
                        extra={"model": model_id, "failed": state.name, "reason": reason},
                    )
                    continue
                upstream.replay(raw)
            if upstream.status == 404:
                # Our picture was stale (evicted, restarted neuron): a routing miss.
                try:
                    raw = await upstream.read(self.idle_timeout)
                except UpstreamError:
                    raw = b'"model_not_found"'  # unreadable: still a routing miss
                finally:
                    upstream.close()
                    self._release(state, model_id)
                if b"model_not_found" not in raw:
                    raise ApiError(
                        404,
                        raw.decode(errors="replace")[:500],
                        type="not_found_error",
                        code="not_found",
                    )
                state.vanished(model_id)
                log.info("stale route", extra={"model": model_id, "node": state.name})
                if attempts >= 2:
                    raise unavailable(
                        f"{model_id!r} vanished from neuron {state.name}",
                        code="model_moved",
                        retry_after=1,
                    )
                continue
            self.metrics.series(model_id, state.name).requests.inc()
            return Call(state, upstream, model_id, started)

    async def _peek(self, upstream: Response) -> bytes:
        """The body of a (small) error answer; unreadable reads as empty."""
        try:
            return await upstream.read(self.idle_timeout)
        except UpstreamError:
            return b""

    def _release(self, state: NeuronState, model_id: str) -> None:
        state.end_request(model_id)

    def close(
        self, call: Call, usage: dict[str, Any] | None, first_token_at: float | None
    ) -> tuple[float | None, float | None]:
        """Hand the connection back and record the request's metrics: the tokens of an
        abandoned request too (what the neuron generated before it was cancelled). Returns
        its time to first token and decode rate (None where not known)."""
        call.upstream.close()
        self._release(call.state, call.model_id)
        end = time.monotonic()
        series = self.metrics.series(call.model_id, call.node)
        series.duration.observe(end - call.started)
        ttft = rate = None
        if first_token_at is not None:
            ttft = first_token_at - call.started
            series.ttft.observe(ttft)
        if usage:
            prompt = usage.get("prompt_tokens") or 0
            completion = usage.get("completion_tokens") or 0
            series.prompt_tokens.inc(prompt)
            series.completion_tokens.inc(completion)
            since = first_token_at or call.started
            if completion and end > since:
                rate = completion / (end - since)
                series.tps.observe(rate)
        return ttft, rate


def elsewhere(raw: bytes) -> str | None:
    """Why a neuron's 503 body means "try another neuron": it is draining (the request
    queued there when it began to), or the model's worker crashed and is being brought
    back. None for any other 503 (queue full, a load): that one is the client's answer."""
    if b'"shutting_down"' in raw:
        return "draining"
    if b'"engine_crashed"' in raw or b'"model_reloading"' in raw:
        return "engine_crashed"
    return None
