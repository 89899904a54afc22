"""HTTP plumbing shared by both daemons: strict JSON bodies, error envelopes, SSE."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from helexa.core.errors import ApiError, anthropic_body, bad_request

log = logging.getLogger("helexa.http")

ModelT = TypeVar("ModelT", bound=BaseModel)
T = TypeVar("T")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _common_prefix(locs: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    prefix = locs[0]
    for loc in locs[1:]:
        size = 0
        while size < min(len(prefix), len(loc)) and prefix[size] == loc[size]:
            size += 1
        prefix = prefix[:size]
    return prefix


def validation_error(exc: ValidationError) -> ApiError:
    # A union field fails once per member ("stop.str", "stop.list[str]"): name the field.
    locs = [tuple(e["loc"]) for e in exc.errors()]
    param = _loc(_common_prefix(locs) or locs[0]) or None
    detail = "; ".join(
        f"{_loc(e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()[:5]
    )
    return bad_request(f"invalid request: {detail}", param=param)


# Deeper than any real request (a tool's JSON schema nests a dozen levels); far below what
# orjson refuses to serialise again (254) when a body is forwarded or translated.
MAX_JSON_DEPTH = 64


def _nested_within(value: dict[str, Any] | list[Any], levels: int) -> bool:
    """Whether ``value`` (itself one level) nests at most ``levels`` deep."""
    if levels <= 0:
        return False
    for item in value.values() if isinstance(value, dict) else value:
        if isinstance(item, (dict, list)) and not _nested_within(item, levels - 1):
            return False
    return True


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    if not _nested_within(data, MAX_JSON_DEPTH):
        raise bad_request(
            f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json"
        )
    return data


def validate(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


# --- reading request bodies -------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLimits:
    """What one request body may be; the server protocol puts its own in the scope."""

    max_body_bytes: int = 32 * 1024 * 1024
    body_timeout_s: float = 30.0  # the longest wait for the next piece of a body


LIMITS_KEY = "helexa.limits"  # scope key of the RequestLimits in force
DEFAULT_LIMITS = RequestLimits()
CLOSE = {"connection": "close"}  # the rest of the body is not read: this connection ends


def _size(limit: int) -> str:
    mib = limit / (1024 * 1024)
    return f"{mib:g} MiB" if mib >= 1 else f"{limit} bytes"


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than the {_size(limit)} limit",
        code="request_too_large",
        headers=dict(CLOSE),
    )


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise bad_request("malformed Content-Length header") from None
    return None


def content_type_ok(value: str | None) -> bool:
    """Whether a body of this ``Content-Type`` may be read as JSON: ``application/json``
    (any parameters) or an ``application/*+json`` type. None (no header: raw HTTP clients)
    is taken as JSON — a browser request without one carries an ``Origin`` or a foreign
    ``Host`` and is refused by ``core.browser``; what a page can send without a preflight
    (text/plain, forms) is refused here."""
    if value is None:
        return True
    media = value.split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def require_json(scope: Scope) -> None:
    """415 unless the request declares a JSON body (or declares nothing)."""
    types = [v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"]
    if all(content_type_ok(t) for t in types) and len(types) <= 1:
        return
    got = ", ".join(repr(t) for t in types)
    raise ApiError(
        415,
        f"the request body must be JSON: send 'Content-Type: application/json' (got {got})",
        code="unsupported_media_type",
        headers=dict(CLOSE),  # the body is not read
    )


async def receive_body(scope: Scope, receive: Receive) -> bytes:
    """The whole request body, never holding more than the limit: a declared length over it
    is refused before anything is read, and the bytes are counted as they arrive. 415 when
    it is not declared JSON, 413 when too large, 408 when the client stops sending for
    ``body_timeout_s``; ``ClientGone`` when it leaves. The one body reader of both daemons
    (every body either takes is JSON)."""
    require_json(scope)
    limits: RequestLimits = scope.get(LIMITS_KEY) or DEFAULT_LIMITS
    limit = limits.max_body_bytes
    declared = _content_length(scope)
    if declared is not None and declared > limit:
        raise body_too_large(limit)
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                message = await receive()
        except TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive: nothing for {limits.body_timeout_s:g}s",
                code="request_timeout",
                headers=dict(CLOSE),
            ) from None
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            parts.append(chunk)
        if not message.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_body(request: Request, model: type[ModelT]) -> ModelT:
    """A Starlette handler's JSON body, validated as ``model``."""
    try:
        raw = await receive_body(request.scope, request.receive)
    except ClientGone:
        raise ApiError(
            499, "the client left before sending its body", code="client_disconnected"
        ) from None
    return validate(model, parse_json(raw))


# --- error envelopes ---------------------------------------------------------------------------

# Routes that answer in Anthropic's envelope, whatever went wrong (cortex serves them).
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})


def error_body(path: str, exc: ApiError) -> bytes:
    """``exc`` in the envelope of the protocol ``path`` speaks."""
    if path.rstrip("/") in ANTHROPIC_PATHS:
        return orjson.dumps(anthropic_body(exc))
    return orjson.dumps(exc.openai_body())


def openai_error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.openai_body(), status_code=exc.status, headers=exc.headers)


async def api_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return openai_error_response(exc)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    error = ApiError(exc.status_code, str(exc.detail), type=kind, code=code, headers=exc.headers)
    if exc.status_code == 404:  # an unknown path speaks no protocol of its own: OpenAI's
        return openai_error_response(error)
    return Response(
        error_body(request.url.path, error),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", extra={"path": request.url.path, "error": repr(exc)}, exc_info=exc)
    return openai_error_response(
        ApiError(
            500,
            f"internal error: {type(exc).__name__}: {exc}",
            type="server_error",
            code="internal_error",
        )
    )


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

# The id cortex gives each request it sends a neuron: the neuron can then cancel it by id
# (``POST /v1/requests/{id}/cancel``) and both access logs name it.
REQUEST_ID_HEADER = "x-helexa-request-id"


def cancel_path(request_id: str) -> str:
    return f"/v1/requests/{request_id}/cancel"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def disconnected(receive: Receive) -> None:
    """Returns once the client has gone (``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await ``work`` in this task while one watcher task waits for the client to leave;
    if it leaves first, this task is cancelled at whatever ``work`` awaits (so what it
    started stops) and ``ClientGone`` is raised. One extra task: this is the hot path."""
    me = asyncio.current_task()
    assert me is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await disconnected(receive)
        gone = True
        me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        result = await work
    except asyncio.CancelledError:
        # Ours alone: the client left. Another canceller too (shutdown): let it through.
        if gone and me.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()
    if gone:  # it left just as the work finished: drop the cancellation we asked for
        me.uncancel()
    return result


async def until_done_or_disconnect(
    pump: Callable[[], Awaitable[None]],
    receive: Receive,
    on_disconnect: Callable[[], None] | None = None,
) -> None:
    """Run ``pump`` (which sends a response) while watching ``receive`` for the client
    leaving; if it leaves, ``pump`` is cancelled at whatever it awaits, so its cleanup
    (cancelling a generation, closing an upstream) runs at once, not at the next send."""

    pump_task = asyncio.ensure_future(pump())
    watch_task = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not pump_task.done():
            pump_task.cancel()
            if on_disconnect is not None:
                on_disconnect()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await pump_task
        with contextlib.suppress(asyncio.CancelledError):
            await watch_task


class EventStreamResponse:
    """``text/event-stream`` whose body generator is closed the moment the client leaves."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        *,
        on_close: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.body = body
        self.on_close = on_close
        # Runs the moment the client is seen leaving, before the body has unwound.
        self.on_disconnect = on_disconnect
        self.headers = {**SSE_HEADERS, **(headers or {})}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        raw_headers += [(k.encode(), v.encode()) for k, v in self.headers.items()]

        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_done_or_disconnect(pump, receive, self.on_disconnect)
        finally:
            aclose = getattr(self.body, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if self.on_close is not None:
                self.on_close()


def openai_app(routes: list[BaseRoute], lifespan: Any) -> Starlette:
    """A Starlette app whose every error, routing ones included, is an OpenAI envelope."""
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_error_handler,
            Exception: unhandled_error_handler,
        },
    )


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
