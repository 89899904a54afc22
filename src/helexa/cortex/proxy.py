"""The OpenAI proxy path (§2.6): raw ASGI, streamed chunk by chunk, never buffered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from helexa.core.errors import ApiError, bad_request
from helexa.core.http import parse_json
from helexa.cortex.fleet import Fleet, NeuronState
from helexa.cortex.metrics import Metrics
from helexa.cortex.router import Router
from helexa.cortex.upstream import Response, UpstreamError, UpstreamTimeout

log = logging.getLogger("helexa.cortex.proxy")

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
FIRST_TOKEN = re.compile(rb'"(?:content|text|reasoning_content)":"[^"]|"tool_calls":\[')
USAGE_ONLY = re.compile(rb'"choices":\[\]')


async def read_body(receive: Receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body"):
        return body
    parts = [body]
    while message.get("more_body"):
        message = await receive()
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": JSON_HEADERS + (headers or [])}
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: ApiError) -> None:
    headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send_json(send, exc.status, orjson.dumps(exc.openai_body()), headers)


class StreamTap:
    """Watches SSE bytes going by: first-token time, the usage frame (dropped when the
    client did not ask for it), without re-encoding anything else."""

    def __init__(self, keep_usage: bool) -> None:
        self.keep_usage = keep_usage
        self.first_token_at: float | None = None
        self.usage: dict[str, Any] | None = None
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        if self._partial:
            chunk, self._partial = self._partial + chunk, b""
        if not chunk.endswith(b"\n\n"):  # an event split across reads: hold the tail
            cut = chunk.rfind(b"\n\n") + 2
            chunk, self._partial = chunk[:cut], chunk[cut:]
        if self.first_token_at is None and FIRST_TOKEN.search(chunk):
            self.first_token_at = time.monotonic()
        if b'"usage"' in chunk:
            chunk = self._take_usage(chunk)
        return chunk

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest

    def _take_usage(self, chunk: bytes) -> bytes:
        kept = []
        for event in chunk.split(b"\n\n"):
            if event.startswith(b"data: {") and b'"usage"' in event:
                with contextlib.suppress(orjson.JSONDecodeError):
                    usage = orjson.loads(event[6:]).get("usage")
                    if usage:
                        self.usage = usage
                if not self.keep_usage and USAGE_ONLY.search(event):
                    continue
            kept.append(event)
        return b"\n\n".join(kept)


class OpenAIProxy:
    """ASGI endpoint for /v1/chat/completions and /v1/completions."""

    def __init__(self, path: str, router: Router, fleet: Fleet, metrics: Metrics) -> None:
        self.path = path
        self.router = router
        self.fleet = fleet
        self.metrics = metrics
        self.idle_timeout = router.settings.proxy.idle_timeout_s
        self.connect_timeout = router.settings.proxy.connect_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = parse_json(await read_body(receive))
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise bad_request("'model' must be a non-empty string", param="model")
        except ApiError as exc:
            await send_error(send, exc)
            return
        await self.forward(body, model, send, receive)

    async def forward(
        self, body: dict[str, Any], requested: str, send: Send, receive: Receive
    ) -> None:
        started = time.monotonic()
        model_id = self.router.catalogue.resolve(requested)
        body["model"] = model_id
        stream = body.get("stream") is True
        keep_usage = False
        if stream:
            options = body.get("stream_options")
            options = options if isinstance(options, dict) else {}
            keep_usage = options.get("include_usage") is True
            body["stream_options"] = {**options, "include_usage": True}
        payload = orjson.dumps(body)
        tried: set[str] = set()
        state: NeuronState | None = None
        try:
            while True:
                state = await self.router.route(model_id, frozenset(tried))
                tried.add(state.name)
                state.in_flight[model_id] = state.in_flight.get(model_id, 0) + 1
                state.last_used[model_id] = time.monotonic()
                try:
                    upstream = await state.pool.request(
                        "POST",
                        self.path,
                        payload,
                        connect_timeout=self.connect_timeout,
                        header_timeout=self.idle_timeout,
                    )
                    break
                except UpstreamError as exc:
                    self._done(state, model_id)
                    self.fleet.report_failure(state, exc)
                    self.metrics.error(model_id, state.name, "upstream_connect")
                    if len(tried) >= 2:
                        raise ApiError(
                            503,
                            f"neuron {state.name} failed: {exc}",
                            type="service_unavailable",
                            code="upstream_unavailable",
                            headers={"Retry-After": "1"},
                        ) from exc
                    log.info(
                        "retry on another neuron", extra={"model": model_id, "failed": state.name}
                    )
                    state = None
        except ApiError as exc:
            self.metrics.error(model_id, state.name if state else "", exc.code or "error")
            await send_error(send, exc)
            return
        node = state.name
        self.metrics.requests.labels(model_id, node).inc()
        try:
            if stream and upstream.status == 200:
                tap = await self._pipe_stream(upstream, send, receive, keep_usage, model_id, node)
                usage, first = (tap.usage, tap.first_token_at) if tap else (None, None)
            else:
                usage, first = await self._pipe_whole(upstream, send, model_id, node)
        finally:
            upstream.close()
            self._done(state, model_id)
        end = time.monotonic()
        self.metrics.duration.labels(model_id, node).observe(end - started)
        if first is not None:
            self.metrics.ttft.labels(model_id, node).observe(first - started)
        if usage:
            self._count_tokens(model_id, node, usage, first or started, end)

    def _done(self, state: NeuronState, model_id: str) -> None:
        state.in_flight[model_id] -= 1
        state.last_used[model_id] = time.monotonic()

    def _count_tokens(
        self, model_id: str, node: str, usage: dict[str, Any], first: float, end: float
    ) -> None:
        prompt = usage.get("prompt_tokens") or 0
        completion = usage.get("completion_tokens") or 0
        self.metrics.prompt_tokens.labels(model_id, node).inc(prompt)
        self.metrics.completion_tokens.labels(model_id, node).inc(completion)
        if completion and end > first:
            self.metrics.tps.labels(model_id, node).observe(completion / (end - first))

    async def _pipe_whole(
        self, upstream: Response, send: Send, model_id: str, node: str
    ) -> tuple[dict[str, Any] | None, float | None]:
        try:
            data = await upstream.read(self.idle_timeout)
        except UpstreamError as exc:
            self.metrics.error(model_id, node, "upstream_read")
            await send_error(
                send,
                ApiError(
                    502,
                    f"neuron {node} failed mid-response: {exc}",
                    type="server_error",
                    code="upstream_failed",
                ),
            )
            return None, None
        headers = [
            (k.lower(), v)
            for k, v in upstream.headers
            if k.lower() in (b"content-type", b"retry-after")
        ]
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        if upstream.status != 200:
            self.metrics.error(model_id, node, f"status_{upstream.status}")
            return None, None
        usage = None
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            usage = orjson.loads(data).get("usage")
        return usage, None

    async def _pipe_stream(
        self,
        upstream: Response,
        send: Send,
        receive: Receive,
        keep_usage: bool,
        model_id: str,
        node: str,
    ) -> StreamTap | None:
        tap = StreamTap(keep_usage)

        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            try:
                while (chunk := await upstream.next_chunk(self.idle_timeout)) is not None:
                    out = tap.feed(chunk)
                    if out:
                        await send({"type": "http.response.body", "body": out, "more_body": True})
                rest = tap.flush()
            except UpstreamError as exc:
                reason = (
                    "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_broken"
                )
                self.metrics.error(model_id, node, reason)
                log.warning(
                    "stream broke", extra={"model": model_id, "node": node, "error": str(exc)}
                )
                error = ApiError(
                    502, f"neuron {node} failed mid-stream: {exc}", type="server_error", code=reason
                )
                rest = tap.flush() + b"data: " + orjson.dumps(error.openai_body()) + b"\n\n"
            await send({"type": "http.response.body", "body": rest, "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch_task.cancel()
            if not pump_task.done():  # the client left: stop reading, drop the upstream
                pump_task.cancel()
                self.metrics.error(model_id, node, "client_disconnected")
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump_task
            with contextlib.suppress(asyncio.CancelledError):
                await watch_task
        return tap
