"""POST /v1/messages and /v1/messages/count_tokens: Anthropic in, OpenAI to the neuron."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from helexa.core import anthropic
from helexa.core.errors import ApiError
from helexa.core.http import (
    ClientGone,
    parse_json,
    unless_disconnected,
    until_done_or_disconnect,
    validate,
)
from helexa.cortex.dispatch import Call, Dispatcher, EventBuffer
from helexa.cortex.proxy import SSE_HEADERS, read_body, send_json
from helexa.cortex.upstream import UpstreamError, UpstreamTimeout

log = logging.getLogger("helexa.cortex.messages")

PING_INTERVAL_S = 10.0


async def send_anthropic_error(send: Send, exc: ApiError) -> None:
    headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send_json(send, exc.status, orjson.dumps(anthropic.api_error_body(exc)), headers)


def _passthrough_headers(call: Call) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in call.upstream.headers if k.lower() == b"retry-after"]


class MessagesProxy:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.metrics = dispatcher.metrics
        self.catalogue = dispatcher.router.catalogue
        self.idle_timeout = dispatcher.idle_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request = validate(anthropic.MessagesRequest, parse_json(await read_body(receive)))
            model_id = self.catalogue.resolve(request.model)
            body = anthropic.to_openai(request, model_id)
            call = await unless_disconnected(
                self.dispatcher.open(
                    model_id, "/v1/chat/completions", orjson.dumps(body), stream=request.stream
                ),
                receive,
            )
        except ApiError as exc:
            await send_anthropic_error(send, exc)
            return
        except ClientGone:
            return
        usage: dict[str, Any] | None = None
        first: float | None = None
        try:
            if call.upstream.status != 200:
                await self._relay_error(call, send)
            elif request.stream:
                translator = anthropic.StreamTranslator(request.model)
                marks: dict[str, float] = {}
                await until_done_or_disconnect(
                    lambda: self._pipe_stream(call, translator, marks, send),
                    receive,
                    lambda: self.dispatcher.client_left(call),
                )
                usage, first = translator.usage, marks.get("first")
            else:
                usage = await unless_disconnected(self._whole(call, request.model, send), receive)
        except ClientGone:
            self.metrics.error(model_id, call.node, "client_disconnected")
        finally:
            self.dispatcher.close(call, usage, first)

    async def _relay_error(self, call: Call, send: Send) -> None:
        status = call.upstream.status
        self.metrics.error(call.model_id, call.node, f"status_{status}")
        try:
            raw = await call.upstream.read(self.idle_timeout)
        except UpstreamError as exc:
            raw = str(exc).encode()
        await send_json(
            send,
            status,
            orjson.dumps(anthropic.error_from_openai(status, raw)),
            _passthrough_headers(call),
        )

    async def _whole(self, call: Call, requested: str, send: Send) -> dict[str, Any] | None:
        try:
            data = orjson.loads(await call.upstream.read(self.idle_timeout))
            message = anthropic.from_openai(data, requested)
        except (UpstreamError, orjson.JSONDecodeError, KeyError, IndexError) as exc:
            self.metrics.error(call.model_id, call.node, "upstream_failed")
            await send_anthropic_error(
                send, ApiError(502, f"neuron {call.node} failed: {exc}", type="server_error")
            )
            return None
        await send_json(send, 200, orjson.dumps(message))
        return data.get("usage")

    async def _pipe_stream(
        self,
        call: Call,
        translator: anthropic.StreamTranslator,
        marks: dict[str, float],
        send: Send,
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send(
            {
                "type": "http.response.body",
                "body": anthropic.render(translator.start()),
                "more_body": True,
            }
        )
        events = EventBuffer()
        idle = 0.0
        tail: list[anthropic.Event] | None = None
        try:
            while tail is None:
                try:
                    chunk = await call.upstream.next_chunk(min(PING_INTERVAL_S, self.idle_timeout))
                except UpstreamTimeout:
                    idle += PING_INTERVAL_S
                    if idle >= self.idle_timeout:
                        raise
                    await send(
                        {
                            "type": "http.response.body",
                            "body": anthropic.render([anthropic.PING]),
                            "more_body": True,
                        }
                    )
                    continue
                idle = 0.0
                if chunk is None:
                    tail = translator.finish()
                    break
                out, tail = self._translate(events.feed(chunk), translator)
                if out:
                    marks.setdefault("first", time.monotonic())
                    await send(
                        {
                            "type": "http.response.body",
                            "body": anthropic.render(out),
                            "more_body": True,
                        }
                    )
        except UpstreamError as exc:
            reason = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_broken"
            self.metrics.error(call.model_id, call.node, reason)
            log.warning(
                "stream broke", extra={"model": call.model_id, "node": call.node, "error": str(exc)}
            )
            tail = translator.error(502, f"neuron {call.node} failed mid-stream: {exc}")
        await send(
            {"type": "http.response.body", "body": anthropic.render(tail), "more_body": False}
        )

    @staticmethod
    def _translate(
        complete: bytes, translator: anthropic.StreamTranslator
    ) -> tuple[list[anthropic.Event], list[anthropic.Event] | None]:
        """Events for the whole SSE events in ``complete``; a tail when the stream ended."""
        out: list[anthropic.Event] = []
        for event in complete.split(b"\n\n"):
            if not event.startswith(b"data: "):
                continue  # keep-alive comments and blank separators
            data = event[6:]
            if data == b"[DONE]":
                return out, translator.finish()
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                return out, translator.error(502, "neuron sent a malformed stream event")
            if "error" in chunk:
                message = (chunk["error"] or {}).get("message", "generation failed")
                return out, translator.error(500, message)
            out += translator.feed(chunk)
        return out, None


class CountTokens:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.catalogue = dispatcher.router.catalogue

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request = validate(anthropic.CountTokensRequest, parse_json(await read_body(receive)))
            model_id = self.catalogue.resolve(request.model)
            body = anthropic.to_tokenize(request, model_id)
            call = await self.dispatcher.open(
                model_id, "/tokenize", orjson.dumps(body), stream=False
            )
        except ApiError as exc:
            await send_anthropic_error(send, exc)
            return
        try:
            raw = await call.upstream.read(self.dispatcher.idle_timeout)
            if call.upstream.status != 200:
                await send_json(
                    send,
                    call.upstream.status,
                    orjson.dumps(anthropic.error_from_openai(call.upstream.status, raw)),
                )
                return
            count = orjson.loads(raw)["count"]
            await send_json(send, 200, orjson.dumps({"input_tokens": count}))
        except (UpstreamError, orjson.JSONDecodeError, KeyError) as exc:
            await send_anthropic_error(
                send, ApiError(502, f"token count failed: {exc}", type="server_error")
            )
        finally:
            with contextlib.suppress(Exception):
                self.dispatcher.close(call, None, None)
