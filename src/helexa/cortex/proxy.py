"""The OpenAI proxy path (§2.6): raw ASGI, streamed chunk by chunk, never buffered."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from helexa.core.errors import ApiError, bad_request
from helexa.core.http import (
    ClientGone,
    parse_json,
    unless_disconnected,
    until_done_or_disconnect,
)
from helexa.cortex.dispatch import Call, Dispatcher, EventBuffer
from helexa.cortex.upstream import UpstreamError, UpstreamTimeout

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
        self._events = EventBuffer()

    def feed(self, chunk: bytes) -> bytes:
        chunk = self._events.feed(chunk)
        if self.first_token_at is None and FIRST_TOKEN.search(chunk):
            self.first_token_at = time.monotonic()
        if b'"usage"' in chunk:
            chunk = self._take_usage(chunk)
        return chunk

    def flush(self) -> bytes:
        return self._events.flush()

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

    def __init__(self, path: str, dispatcher: Dispatcher) -> None:
        self.path = path
        self.dispatcher = dispatcher
        self.metrics = dispatcher.metrics
        self.catalogue = dispatcher.router.catalogue
        self.idle_timeout = dispatcher.idle_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = parse_json(await read_body(receive))
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise bad_request("'model' must be a non-empty string", param="model")
            model_id = self.catalogue.resolve(model)
            body["model"] = model_id
            stream = body.get("stream") is True
            keep_usage = False
            if stream:  # cortex always wants usage for its metrics
                options = body.get("stream_options")
                options = options if isinstance(options, dict) else {}
                keep_usage = options.get("include_usage") is True
                body["stream_options"] = {**options, "include_usage": True}
            call = await unless_disconnected(
                self.dispatcher.open(model_id, self.path, orjson.dumps(body), stream=stream),
                receive,
            )
        except ApiError as exc:
            await send_error(send, exc)
            return
        except ClientGone:
            return  # left while its request was routed or answered: nobody to tell
        usage: dict[str, Any] | None = None
        first: float | None = None
        try:
            if stream and call.upstream.status == 200:
                tap = StreamTap(keep_usage)
                await until_done_or_disconnect(
                    lambda: self._pipe_stream(call, tap, send),
                    receive,
                    lambda: self.dispatcher.client_left(call),
                )
                usage, first = tap.usage, tap.first_token_at
            else:
                usage = await unless_disconnected(self._pipe_whole(call, send), receive)
        except ClientGone:
            self.metrics.error(model_id, call.node, "client_disconnected")
        finally:
            self.dispatcher.close(call, usage, first)

    async def _pipe_whole(self, call: Call, send: Send) -> dict[str, Any] | None:
        upstream = call.upstream
        try:
            data = await upstream.read(self.idle_timeout)
        except UpstreamError as exc:
            self.metrics.error(call.model_id, call.node, "upstream_read")
            await send_error(
                send,
                ApiError(
                    502,
                    f"neuron {call.node} failed mid-response: {exc}",
                    type="server_error",
                    code="upstream_failed",
                ),
            )
            return None
        headers = [
            (k.lower(), v)
            for k, v in upstream.headers
            if k.lower() in (b"content-type", b"retry-after")
        ]
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
        if upstream.status != 200:
            self.metrics.error(call.model_id, call.node, f"status_{upstream.status}")
            return None
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            return orjson.loads(data).get("usage")
        return None

    async def _pipe_stream(self, call: Call, tap: StreamTap, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        try:
            while (chunk := await call.upstream.next_chunk(self.idle_timeout)) is not None:
                out = tap.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            rest = tap.flush()
        except UpstreamError as exc:
            reason = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_broken"
            self.metrics.error(call.model_id, call.node, reason)
            log.warning(
                "stream broke", extra={"model": call.model_id, "node": call.node, "error": str(exc)}
            )
            error = ApiError(
                502,
                f"neuron {call.node} failed mid-stream: {exc}",
                type="server_error",
                code=reason,
            )
            tap.flush()  # a half-received event cannot be completed: drop it
            rest = b"data: " + orjson.dumps(error.openai_body()) + b"\n\n"
        await send({"type": "http.response.body", "body": rest, "more_body": False})
