"""One access-log line per request on the neuron (logger ``helexa.neuron.access``):

    msg=request method=POST path=/v1/chat/completions model=Qwen/Qwen3-8B status=200
    outcome=ok secs=3.2 request_id=9f… prompt_tokens=12 completion_tokens=200

``secs`` runs to the last byte sent, so a stream counts whole. ``outcome`` is ``ok``,
``error`` (a 4xx/5xx, or a stream that ended in an error event) or ``abandoned``: the
client left, or cortex cancelled the request because its own client left; that line says
``status=499`` whatever the head said, on both paths, and its ``completion_tokens`` is what
was generated before the generation stopped. The inference routes fill in the tokens and
``request_id`` (the ``x-helexa-request-id`` cortex sent) through ``record_of``.

The routes cortex polls every few seconds (``GET /health``, ``/models``, ``/discovery``) log
at debug when they succeed, so a journal shows requests, not the poller. ``model`` is the
body's ``model`` (or ``model_id`` for the lifecycle routes), read from the bytes the handler
received: nothing is read twice from the client and nothing is parsed unless the request
had a JSON body.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("helexa.neuron.access")

# Polled by cortex (2.2): a line each would drown the journal.
QUIET = frozenset({"/health", "/models", "/discovery", "/v1/models"})
# Bodies beyond this are not kept for the model name (the limits layer refuses far less).
MAX_CAPTURE = 64 * 1024 * 1024


SCOPE_KEY = "helexa.neuron.record"


@dataclass
class Accounting:
    """What an inference handler tells the access log about its request."""

    request_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # None: not known (the generation failed)
    abandoned: bool = False  # the client left, or cortex cancelled it by request id
    error: str | None = None  # the code of the error event a 200 stream ended with


def record_of(scope: Scope) -> Accounting:
    record = scope.get(SCOPE_KEY)
    if record is None:  # a handler called without the middleware (unit tests)
        record = scope[SCOPE_KEY] = Accounting()
    return record


def outcome(status: int, record: Accounting) -> str:
    """``abandoned`` before anything else: a request the client gave up is neither the
    neuron's success nor its failure."""
    if record.abandoned:
        return "abandoned"
    return "error" if status >= 400 or record.error is not None else "ok"


def model_of(body: bytes) -> str | None:
    """The ``model`` (or ``model_id``) a JSON request body names, if any."""
    if not body:
        return None
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    name = data.get("model", data.get("model_id"))
    return name if isinstance(name, str) else None


class AccessLog:
    """Pure ASGI middleware: add with ``app.add_middleware(AccessLog)``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        record = scope[SCOPE_KEY] = Accounting()
        status = 0
        chunks: list[bytes] = []
        size = 0
        model: str | None = None
        capture = scope["method"] == "POST"

        async def tracking_receive() -> Message:
            nonlocal size, model
            message = await receive()
            if capture and message["type"] == "http.request":
                body = message.get("body", b"")
                size += len(body)
                if size <= MAX_CAPTURE:
                    chunks.append(body)
                if not message.get("more_body", False):  # the whole body: name it, let it go
                    model = model_of(b"".join(chunks)) if size <= MAX_CAPTURE else None
                    chunks.clear()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, tracking_receive if capture else receive, tracking_send)
        except Exception:  # the error handler outside answers 500
            status = status or 500
            raise
        finally:
            seconds = time.monotonic() - started
            # Nothing sent: the client left first. Abandoned: the same on both paths,
            # although a stream's head said 200.
            final = 499 if record.abandoned else status or 499
            path = scope["path"]
            level = logging.DEBUG if path in QUIET and final < 400 else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": path,
                        "model": model,
                        "status": final,
                        "outcome": outcome(final, record),
                        "secs": round(seconds, 4),
                        "request_id": record.request_id,
                        "prompt_tokens": record.prompt_tokens,
                        "completion_tokens": record.completion_tokens,
                        "error": record.error,
                    },
                )
