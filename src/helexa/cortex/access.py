"""One access-log line and the error count for every request, whatever route served it.

The proxy routes go straight to their endpoints (no middleware or router walk on the hot
path); everything else (other routes, 404/405, lifespan) goes through Starlette. Both are
wrapped here: the handler fills in a ``RequestRecord`` (model, node, usage, error code) and
this layer adds status and duration, logs, and counts every 4xx/5xx once in
``cortex_request_errors_total`` — and every 200 whose stream broke, and every request its
client abandoned (``outcome``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helexa.core.browser import BrowserGuard, answer
from helexa.core.errors import ApiError
from helexa.cortex.activity import RecentRequests
from helexa.cortex.auth import envelope
from helexa.cortex.metrics import Metrics
from helexa.cortex.record import SCOPE_KEY, RequestRecord
from helexa.cortex.translate.tool_set import named

if TYPE_CHECKING:
    from helexa.cortex.auth import Guard

log = logging.getLogger("helexa.cortex.access")


ABANDONED_STATUS = 499  # logged for an abandoned request, whatever its head said


def outcome(status: int, error: str | None) -> str:
    """How a request ended, for the access log: ``ok``; ``abandoned`` (the client hung up
    before its answer was complete, streamed or not: logged as 499 with the tokens the
    neuron generated); ``error`` (a 4xx/5xx answer); ``broken`` (a 200 whose stream ended
    in an error event: the neuron died or stalled, a drain cut it). Every one but ``ok`` is
    counted in ``cortex_request_errors_total`` (an abandoned one as ``client_disconnected``)."""
    if error == "client_disconnected":
        return "abandoned"
    if status >= 400:
        return "error"
    return "ok" if error is None else "broken"


class AccessLog:
    """The outermost ASGI layer of cortex's API."""

    def __init__(
        self,
        app: ASGIApp,
        hot: dict[str, ASGIApp],
        metrics: Metrics,
        model_label: Callable[[str | None], str],
        guard: Guard | None = None,
        browser: BrowserGuard | None = None,
        recent: RecentRequests | None = None,
    ) -> None:
        self.recent = recent  # the dashboard's recent requests
        self.browser = browser  # what web pages may ask (core.browser): checked first
        self.guard = guard  # who may call (cortex.auth): checked before any route runs
        self.app = app
        self.hot = hot
        self.metrics = metrics
        self.model_label = model_label  # client-chosen names must not become label values

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        record = scope[SCOPE_KEY] = RequestRecord()
        handler = self.hot.get(scope["path"]) if scope["method"] == "POST" else None

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            serve: Send | None = tracking_send
            if self.browser is not None:
                screen = self.browser.screen(scope)
                record.error = screen.error.code if screen.error is not None else None
                serve = await answer(screen, scope, tracking_send, envelope)
            if serve is None:
                return
            if self.guard is not None and not await self.guard.admit(scope, record, serve):
                return
            await (handler or self.app)(scope, receive, serve)
        except Exception as exc:  # a bug, not an API error: still an envelope, if we can
            log.error(
                "unhandled error", extra={"path": scope["path"], "error": repr(exc)}, exc_info=exc
            )
            record.error = "internal_error"
            if not record.status:
                error = ApiError(
                    500,
                    f"internal error: {type(exc).__name__}: {exc}",
                    type="server_error",
                    code="internal_error",
                )
                await tracking_send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send(
                    {"type": "http.response.body", "body": orjson.dumps(error.openai_body())}
                )
        finally:
            self._finish(scope, record, time.monotonic() - started)

    def _finish(self, scope: Scope, record: RequestRecord, seconds: float) -> None:
        status = record.status or ABANDONED_STATUS  # nothing was sent: the client left first
        result = outcome(status, record.error)
        if result == "abandoned":  # the same on both paths, although a stream said 200
            status = ABANDONED_STATUS
        if result != "ok":
            reason = record.error or f"status_{status}"
            self.metrics.error(self.model_label(record.model_id), record.node or "", reason)
        if record.key is not None:
            self.metrics.by_key(record.key)
        usage = record.usage or {}
        if self.recent is not None and scope["path"] != "/admin/dashboard":
            self.recent.add(
                time.time(), scope["method"], scope["path"], status, result, seconds, record
            )
        log.info(
            "request",
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "model": record.model,
                "status": status,
                "outcome": result,
                "secs": round(seconds, 4),
                "node": record.node,
                "key": record.key,
                "request_id": record.request_id,
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "error": record.error,
                "omitted_tools": named(record.omitted_tools, ",") or None,
            },
        )
