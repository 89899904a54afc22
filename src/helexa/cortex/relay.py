"""The one path every proxied request takes through cortex (§2.6): read the body, resolve
the model, dispatch to a neuron, relay the answer — whole, or streamed chunk by chunk.

Client protocols (OpenAI passthrough, Anthropic Messages, OpenAI Responses, …) plug in as
a ``ClientProtocol``: how to turn their request into a neuron request, how to word an
error, how to translate a whole answer, and a ``StreamCodec`` for streamed ones. The relay
loop, disconnect handling (with ``cortex.abandon``), keep-alives and accounting exist once,
here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from starlette.types import Receive, Scope, Send

from helexa.core.errors import ApiError
from helexa.core.http import REQUEST_ID_HEADER, ClientGone, parse_json, receive_body
from helexa.core.stream import (
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    chunk_events,
)
from helexa.cortex.abandon import CANCELLABLE, ClientWatch, new_request_id
from helexa.cortex.auth import require_model
from helexa.cortex.dispatch import Call, Dispatcher
from helexa.cortex.drain import Drain
from helexa.cortex.fleet import NeuronState
from helexa.cortex.record import RequestRecord, record_of
from helexa.cortex.translate.tool_set import OMITTED_HEADER, header_value
from helexa.cortex.upstream import GatewayShutdown, UpstreamError, UpstreamTimeout

log = logging.getLogger("helexa.cortex.proxy")

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
PING_INTERVAL_S = 10.0  # keep-alive cadence towards clients while a neuron is quiet
REQUEST_ID = REQUEST_ID_HEADER.encode()


async def send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": JSON_HEADERS + (headers or [])}
    )
    await send({"type": "http.response.body", "body": body})


def error_headers(exc: ApiError) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]


def header(scope: Scope, name: bytes) -> str | None:
    """A request header (lower-case ``name``), decoded; None when absent."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def error_code(raw: bytes) -> str | None:
    """The ``code`` of an OpenAI error envelope, for the metrics' reason label."""
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        code = orjson.loads(raw).get("error", {}).get("code")
        return code if isinstance(code, str) else None
    return None


# --- what a protocol plugs in ----------------------------------------------------------------


@dataclass
class NeuronRequest:
    """What goes to the neuron for one client request."""

    path: str
    body: dict[str, Any]
    stream: bool
    affinity: str | None = None  # conversation key: same replica while it is healthy
    context: Any = None  # the protocol's parsed request, for translating the answer
    omitted: tuple[str, ...] = ()  # the client's tools no model here can call (left out)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Headers every answer to this request carries (what the client should know)."""
        return [(OMITTED_HEADER, header_value(self.omitted))] if self.omitted else []


class StreamCodec(Protocol):
    """Turns the neuron's SSE bytes into the client's. ``feed`` gets whole SSE events and
    says when the stream is over; the relay sends whatever comes back as it comes."""

    usage: dict[str, Any] | None
    first_token_at: float | None
    # Why the stream did not finish (an error event's code: the neuron's, or the one the
    # codec wrote); None while it is whole. The access log and error count read it.
    error: str | None
    # The client has had its answer's end ([DONE], or the error event that ends it): a
    # client that hangs up now (before the body's own end) did not abandon it.
    complete: bool

    def opening(self) -> bytes: ...

    def feed(self, events: bytes) -> tuple[bytes, bool]: ...

    def idle(self) -> bytes | None:
        """Bytes to send while the neuron is quiet (None: nothing, wait on)."""
        ...

    def end(self) -> bytes:
        """The neuron closed the stream without finishing it."""
        ...

    def fail(self, status: int, message: str, code: str) -> bytes: ...


class ClientProtocol(Protocol):
    def model_of(self, body: dict[str, Any]) -> str: ...

    def translate(self, body: dict[str, Any], model_id: str, scope: Scope) -> NeuronRequest: ...

    def error_body(self, exc: ApiError) -> bytes: ...

    def upstream_error(self, status: int, raw: bytes) -> bytes: ...

    def whole(
        self, data: dict[str, Any], raw: bytes, request: NeuronRequest, requested_model: str
    ) -> bytes: ...

    def codec(self, request: NeuronRequest, requested_model: str) -> StreamCodec: ...


class EventBuffer:
    """Passes on only whole SSE events; a tail split across reads waits for the rest."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> bytes:
        if self._partial:
            chunk, self._partial = self._partial + chunk, b""
        if not chunk.endswith(b"\n\n"):
            cut = chunk.rfind(b"\n\n") + 2
            chunk, self._partial = chunk[:cut], chunk[cut:]
        return chunk

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest


# --- the endpoint ----------------------------------------------------------------------------


class Endpoint:
    """ASGI endpoint for one proxied route, speaking ``protocol`` to the client."""

    def __init__(self, protocol: ClientProtocol, dispatcher: Dispatcher, drain: Drain) -> None:
        self.protocol = protocol
        self.dispatcher = dispatcher
        self.drain = drain  # cortex's SIGTERM: its deadline ends what is still in flight
        self.router = dispatcher.router
        self.metrics = dispatcher.metrics
        self.idle_timeout = dispatcher.idle_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protocol = self.protocol
        record = record_of(scope)
        try:
            body = parse_json(await receive_body(scope, receive))  # limits: 413, 408
            requested = protocol.model_of(body)
            record.model = requested
            # The model is checked before the rest of the body: an unknown name is a 404
            # whatever else is wrong with the request.
            model_id = self.router.resolve(requested)
            if record.models is not None:  # the key has an allowlist: 403 outside it
                grants = self.router.granting(requested, model_id)
                require_model(record.models, requested, model_id, grants)
            self.router.require_known(model_id)
            record.model_id = model_id
            request = protocol.translate(body, model_id, scope)
            record.omitted_tools = request.omitted
        except ApiError as exc:
            record.error = exc.code or "error"
            await send_json(send, exc.status, protocol.error_body(exc), error_headers(exc))
            return
        except ClientGone:
            record.error = "client_disconnected"
            return  # left while sending its request: nobody to tell
        except Exception as exc:  # a translator bug: a 500 in the client's own envelope
            log.error("request translation failed", extra={"error": repr(exc)}, exc_info=exc)
            record.error = "internal_error"
            error = ApiError(
                500,
                f"internal error translating the request ({type(exc).__name__})",
                type="server_error",
                code="internal_error",
            )
            await send_json(send, 500, protocol.error_body(error))
            return
        # From here a client that leaves is watched for (cortex.abandon): the request is
        # ended at once while it has not reached a neuron, cancelled there once it has.
        watch = ClientWatch(receive, send)
        try:
            await self._proxy(request, model_id, requested, record, watch)
        except asyncio.CancelledError:
            if not watch.left():
                raise  # not the client's doing (shutdown): let it through
        except ClientGone:
            pass  # it left before a retry: no second neuron for nobody
        finally:
            watch.close()
            if watch.gone:
                record.error = "client_disconnected"

    async def _proxy(
        self,
        request: NeuronRequest,
        model_id: str,
        requested: str,
        record: RequestRecord,
        watch: ClientWatch,
    ) -> None:
        """Route, send and relay, talking to the client through ``watch.send``."""
        protocol = self.protocol
        send = watch.send
        request_id = record.request_id = new_request_id()
        cancellable = request.path in CANCELLABLE

        def tried(state: NeuronState) -> None:
            if watch.gone:
                raise ClientGone
            record.node = state.name
            if cancellable:
                watch.neuron = (state.pool, request_id)

        try:
            call = await self.drain.routing(
                self.dispatcher.open(
                    model_id,
                    request.path,
                    orjson.dumps(request.body),
                    stream=request.stream,
                    affinity=request.affinity,
                    headers=[(REQUEST_ID, request_id.encode())],
                    tried=tried,
                )
            )
        except ApiError as exc:
            record.error = exc.code or "error"
            headers = error_headers(exc) + request.headers()
            await send_json(send, exc.status, protocol.error_body(exc), headers)
            return
        record.node = call.node
        usage: dict[str, Any] | None = None
        first: float | None = None
        self.drain.relaying(call.upstream)
        try:
            if call.upstream.status != 200:
                await self._relay_error(call, request, send, record)
            elif request.stream:
                codec = protocol.codec(request, requested)
                try:
                    await self._relay_stream(call, request, codec, watch)
                finally:  # cut short (the client left and the neuron did not end): so far
                    usage, first = codec.usage, codec.first_token_at
                # A 200 whose stream broke is an error all the same: logged and counted.
                record.error = record.error or codec.error
            else:
                usage = await self._relay_whole(call, request, requested, send, record)
        finally:
            self.drain.relayed(call.upstream)
            record.usage = usage
            record.ttft_s, record.tokens_per_s = self.dispatcher.close(call, usage, first)

    async def _relay_error(
        self, call: Call, request: NeuronRequest, send: Send, record: RequestRecord
    ) -> None:
        status = call.upstream.status
        try:
            raw = await call.upstream.read(self.idle_timeout)
        except UpstreamError as exc:
            raw = orjson.dumps(
                {"error": {"message": f"neuron {call.node} answered {status}: {exc}"}}
            )
        record.error = error_code(raw) or f"status_{status}"
        passthrough = [
            (k.lower(), v) for k, v in call.upstream.headers if k.lower() == b"retry-after"
        ]
        headers = passthrough + request.headers()
        await send_json(send, status, self.protocol.upstream_error(status, raw), headers)

    async def _relay_whole(
        self, call: Call, request: NeuronRequest, requested: str, send: Send, record: RequestRecord
    ) -> dict[str, Any] | None:
        try:
            raw = await call.upstream.read(self.idle_timeout)
            data = orjson.loads(raw)
            out = self.protocol.whole(data, raw, request, requested)
        except GatewayShutdown:
            error = self.drain.error()
            record.error = error.code
            headers = error_headers(error) + request.headers()
            await send_json(send, 503, self.protocol.error_body(error), headers)
            return None
        except (UpstreamError, orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            record.error = "upstream_read"
            error = ApiError(
                502,
                f"neuron {call.node} failed mid-response: {exc}",
                type="server_error",
                code="upstream_failed",
            )
            await send_json(send, 502, self.protocol.error_body(error), request.headers())
            return None
        await send_json(send, 200, out, request.headers())
        return data.get("usage")

    async def _relay_stream(
        self, call: Call, request: NeuronRequest, codec: StreamCodec, watch: ClientWatch
    ) -> None:
        send = watch.send
        headers = SSE_HEADERS + request.headers()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        opening = codec.opening()
        if opening:
            await send({"type": "http.response.body", "body": opening, "more_body": True})
        quiet = 0.0
        try:
            while True:
                # Pings to the client every PING_INTERVAL_S; the neuron is given up after
                # idle_timeout_s of silence in all, whatever the ping cadence.
                wait = min(PING_INTERVAL_S, self.idle_timeout - quiet)
                try:
                    chunk = await call.upstream.next_chunk(wait)
                except UpstreamTimeout:
                    quiet += wait
                    if quiet >= self.idle_timeout:
                        raise UpstreamTimeout(
                            f"neuron sent nothing for {quiet:g}s "
                            f"(proxy.idle_timeout_s = {self.idle_timeout:g})"
                        ) from None
                    ping = codec.idle()
                    if ping is not None:
                        await send({"type": "http.response.body", "body": ping, "more_body": True})
                    continue
                quiet = 0.0
                if chunk is None:
                    tail = codec.end()
                    break
                out, done = codec.feed(chunk)
                if codec.complete:
                    watch.answered()
                if done:
                    tail = out
                    break
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except UpstreamError as exc:
            status, code, message = stream_failure(exc, call.node)
            log.warning(
                "stream broke",
                extra={"model": call.model_id, "node": call.node, "code": code, "error": str(exc)},
            )
            tail = codec.fail(status, message, code)
        await send({"type": "http.response.body", "body": tail, "more_body": False})


# --- codecs ----------------------------------------------------------------------------------

UNFINISHED = "upstream_broken"  # the neuron ended the body with neither [DONE] nor an error
UNFINISHED_MESSAGE = "the neuron ended the stream before finishing it"


def stream_failure(exc: UpstreamError, node: str) -> tuple[int, str, str]:
    """(status, code, message) of the error event that ends a relayed stream that broke:
    cortex's own drain deadline (503, transient), or the neuron dying or going silent."""
    if isinstance(exc, GatewayShutdown):
        return 503, "shutting_down", str(exc)
    code = "upstream_timeout" if isinstance(exc, UpstreamTimeout) else "upstream_broken"
    return 502, code, f"neuron {node} failed mid-stream: {exc}"


def neuron_error(error: Any) -> tuple[int, str, str]:
    """(status, message, code) of the error event a neuron ended its stream with: 503 for
    a transient one (draining, queue timeout), else 500."""
    error = error if isinstance(error, dict) else {}
    message = error.get("message")
    code = error.get("code")
    status = 503 if error.get("type") == "service_unavailable" else 500
    return (
        status,
        message if isinstance(message, str) else "generation failed",
        code if isinstance(code, str) and code else "upstream_error",
    )


class Translator(Protocol):
    """An event translator from the events of OpenAI chat chunks (cortex.translate)."""

    @property
    def usage(self) -> dict[str, Any]: ...

    def feed(self, events: list[StreamEvent]) -> list[tuple[str, dict[str, Any]]]: ...

    def finish(self) -> list[tuple[str, dict[str, Any]]]: ...

    def error(self, status: int, message: str) -> list[tuple[str, dict[str, Any]]]: ...


def render_events(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return b"".join(
        b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        for name, data in events
    )


def _has_output(events: list[StreamEvent]) -> bool:
    return any(isinstance(e, (TextDelta, ReasoningDelta, ToolCallDelta)) for e in events)


class EventCodec:
    """For translated protocols: each OpenAI chunk is parsed and re-emitted as the
    client protocol's events; the neuron's keep-alive comments become the protocol's."""

    def __init__(
        self,
        translator: Translator,
        *,
        opening: list[tuple[str, dict[str, Any]]] | None = None,
        keepalive: Any = None,
    ) -> None:
        self.translator = translator
        self._opening = opening or []
        # A callable giving the protocol's keep-alive events; None: an SSE comment.
        self._keepalive = keepalive
        self._events = EventBuffer()
        self.first_token_at: float | None = None
        self.error: str | None = None
        self.complete = False

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.translator.usage or None

    def opening(self) -> bytes:
        return render_events(self._opening)

    def idle(self) -> bytes | None:
        if self._keepalive is None:
            return b": keep-alive\n\n"
        return render_events(self._keepalive())

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        out: list[tuple[str, dict[str, Any]]] = []
        pings = b""
        for event in self._events.feed(chunk).split(b"\n\n"):
            if event.startswith(b":"):
                pings = self.idle() or b""
                continue
            if not event.startswith(b"data: "):
                continue
            data = event[6:]
            if data == b"[DONE]":
                self.complete = True
                return render_events(out + self.translator.finish()), True
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                self.error = "upstream_malformed"
                out += self.translator.error(502, "neuron sent a malformed stream event")
                return render_events(out), True
            if "error" in parsed:
                status, message, self.error = neuron_error(parsed["error"])
                self.complete = True
                return render_events(out + self.translator.error(status, message)), True
            events = chunk_events(parsed)
            if self.first_token_at is None and _has_output(events):
                self.first_token_at = time.monotonic()
            out += self.translator.feed(events)
        return (render_events(out) if out else pings), False

    def end(self) -> bytes:
        self.error = UNFINISHED
        return render_events(self.translator.error(502, UNFINISHED_MESSAGE))

    def fail(self, status: int, message: str, code: str) -> bytes:
        self._events.flush()  # a half-received event cannot be completed: drop it
        self.error = code
        return render_events(self.translator.error(status, message))
