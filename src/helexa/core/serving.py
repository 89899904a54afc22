"""Running a Starlette app under uvicorn with a drain phase and a clean exit status, behind
an HTTP protocol that bounds what a client may hold: header and body read timeouts, a
header size limit, and a connection cap that sheds the slowest clients first."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
from pydantic import BaseModel, Field
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from helexa.core.errors import ApiError
from helexa.core.http import LIMITS_KEY, RequestLimits, error_body

log = logging.getLogger("helexa.serving")


class LimitsSettings(BaseModel):
    """``[limits]`` of cortex.toml and neuron.toml: what one client may send or hold."""

    max_body_mb: float = Field(default=32.0, gt=0)  # request body (MiB) → 413
    body_timeout_s: float = Field(default=30.0, gt=0)  # silence in the middle of a body → 408
    header_timeout_s: float = Field(default=10.0, gt=0)  # connection to end of headers → 408
    max_header_kb: int = Field(default=64, ge=1)  # request line + headers (KiB) → 431
    # Open connections; beyond it the oldest one still sending (or idle) is closed first.
    max_connections: int = Field(default=4096, ge=1)

    def server_limits(self) -> ServerLimits:
        return ServerLimits(
            request=RequestLimits(
                max_body_bytes=int(self.max_body_mb * 1024 * 1024),
                body_timeout_s=self.body_timeout_s,
            ),
            header_timeout_s=self.header_timeout_s,
            max_header_bytes=self.max_header_kb * 1024,
            max_connections=self.max_connections,
        )


@dataclass(frozen=True)
class ServerLimits:
    request: RequestLimits = field(default_factory=RequestLimits)
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 4096
    linger_s: float = 2.0  # after an early answer, how long the rest of a request is read


def open_file_limit() -> int:
    """The soft limit on open files in force (``core.limits.raise_nofile`` lifts it first)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


# What a connection is doing; a connection is shed only while its client owes us bytes.
IDLE, HEADERS, BODY, SERVED, LINGERING = range(5)
SHEDDABLE = (IDLE, HEADERS, BODY)


class _CycleTransport:
    """The transport a request cycle writes to: closing it while the request is still
    arriving half-closes instead (see ``GuardedProtocol.linger``), so the client reads the
    whole answer rather than a reset."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.write = transport.write
        self.is_closing = transport.is_closing
        self.get_extra_info = transport.get_extra_info

    def close(self) -> None:
        if self._protocol.phase in (BODY, LINGERING):
            self._protocol.linger()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _ShedLog:
    """One warning per ``every_s`` while connections are being shed, with the count."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.count = 0
        self.last = float("-inf")

    def note(self, now: float, limit: int) -> None:
        self.count += 1
        if now - self.last >= self.every_s:
            log.warning(
                "connection limit reached: closed the longest-waiting connections",
                extra={"limit": limit, "closed": self.count},
            )
            self.last, self.count = now, 0


_SHED_LOG = _ShedLog()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus what it lacks against slow or oversized clients:

    - headers must be complete ``header_timeout_s`` after the connection (or the first byte
      of a keep-alive request) → 408, then closed; a connection that sent nothing is closed;
    - request line + headers over ``max_header_bytes`` → 431;
    - the request limits go into the scope for ``receive_body`` (413, 408 between chunks);
    - an answer given before the body arrived (413, 408, 404 …) ends the connection with a
      lingering close: the answer, a FIN, the rest read and dropped for ``linger_s``;
    - over ``max_connections``, the connection that has waited longest on its client (idle,
      in its headers or in its body) is closed, so a flood of half-sent requests cannot
      exhaust file descriptors and starve /health.

    Every error here is a whole response in an API envelope (plain text never leaves)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits: ServerLimits = getattr(config, "helexa_limits", None) or ServerLimits()
        self.phase = IDLE
        self.since = self.loop.time()
        self._received = 0  # bytes of the request being read before its headers end
        self._header_bytes = 0  # its request line and headers as parsed
        self._timer: asyncio.TimerHandle | None = None
        self._too_large = False
        self._cycle_transport: _CycleTransport | None = None

    # -- state ------------------------------------------------------------------------------

    def _enter(self, phase: int) -> None:
        self.phase = phase
        self.since = self.loop.time()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._cycle_transport = _CycleTransport(transport, self)
        self._enter(IDLE)
        self._arm(self.limits.header_timeout_s, self._header_timeout)
        if len(self.connections) > self.limits.max_connections:
            self._shed()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._enter(LINGERING)  # nothing more to read or shed
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase == LINGERING:
            return  # the answer is sent: the rest of the request is dropped
        reading_headers = self.phase in (IDLE, HEADERS)
        if reading_headers:
            if self._timer is None:  # the first bytes of a keep-alive request
                self._arm(self.limits.header_timeout_s, self._header_timeout)
            self._received += len(data)
        super().data_received(data)
        # httptools buffers a header until it ends: count what arrived, not only what parsed.
        if reading_headers and self.phase == HEADERS and self._received > self._header_cap:
            self._too_large = True
            self.send_400_response("")

    @property
    def _header_cap(self) -> int:
        return self.limits.max_header_bytes

    def _header_timeout(self) -> None:
        self._timer = None
        if self.phase == IDLE and not self._received:
            self.transport.close()  # connected and said nothing: nothing to answer
            self._enter(LINGERING)
            return
        if self.phase in (IDLE, HEADERS):
            seconds = self.limits.header_timeout_s
            self.reject(408, f"the request headers did not arrive within {seconds:g}s")

    def _shed(self) -> None:
        victims = [
            c
            for c in self.connections
            if isinstance(c, GuardedProtocol) and c is not self and c.phase in SHEDDABLE
        ]
        if not victims:
            return
        victim = min(victims, key=lambda c: c.since)
        _SHED_LOG.note(self.loop.time(), self.limits.max_connections)
        if victim.phase == HEADERS:
            victim.reject(503, "the server is at its connection limit; retry", "overloaded")
        else:  # idle: nothing to answer; in its body: the handler sees the client leave
            victim.phase = LINGERING
            victim.transport.close()

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # a request pipelined behind one being answered
            self._arm(self.limits.header_timeout_s, self._header_timeout)
        self._enter(HEADERS)
        self._too_large = False
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value) + 4)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self._header_cap:
            self._too_large = True
            raise ValueError("request headers too large")  # stops the parser: → 431

    def on_headers_complete(self) -> None:
        self._disarm()
        self._enter(BODY)
        self.scope[LIMITS_KEY] = self.limits.request  # type: ignore[literal-required]
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:
            self.cycle.transport = self._cycle_transport  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.phase == BODY:
            self._enter(SERVED)

    def on_response_complete(self) -> None:
        if self.pipeline:  # the phase is that of the request queued behind this one
            super().on_response_complete()
            return
        if self.phase in (BODY, LINGERING):
            # Answered before the whole request arrived (413, 408, a route that reads no
            # body): the rest is not worth reading; end the connection cleanly.
            self.server_state.total_requests += 1
            self.linger()
            return
        self._enter(IDLE)
        self._received = 0
        super().on_response_complete()

    # -- ending a connection ------------------------------------------------------------------

    def linger(self) -> None:
        """Half-close: the client gets the whole answer and a FIN; what it still sends is
        read and dropped for ``linger_s`` (closing on unread bytes would send a reset that
        can destroy the answer before the client reads it), then the connection closes."""
        if self.phase == LINGERING and self._timer is not None:
            return
        self._enter(LINGERING)
        transport = self.transport
        if transport.is_closing():
            return
        self.flow.resume_reading()
        try:
            if not transport.can_write_eof():
                transport.close()
                return
            transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        self._arm(self.limits.linger_s, transport.close)

    def reject(self, status: int, message: str, code: str | None = None) -> None:
        """Answer ``status`` in the envelope of the requested route and end the connection."""
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self.phase != BODY or cycle.response_started or self.pipeline:
                # A request pipelined behind an answer still being written: no room for ours.
                self._enter(LINGERING)
                self.transport.close()
                return
            # Its own body is broken (a bad chunk): the app sees the client leave and
            # anything it still sends is dropped; the client gets this answer.
            cycle.disconnected = True
            cycle.message_event.set()
        path = getattr(self, "url", b"").split(b"?", 1)[0].decode("latin-1")
        default = {408: "request_timeout", 431: "request_header_fields_too_large"}
        error = ApiError(
            status,
            message,
            type="service_unavailable" if status == 503 else "invalid_request_error",
            code=code or default.get(status, "invalid_request"),
            headers={"Retry-After": "1"} if status == 503 else None,
        )
        body = error_body(path, error)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        for name, value in error.headers.items():
            head += [name.encode(), b": ", value.encode(), b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        if not self.transport.is_closing():
            self.transport.write(b"".join(head))
        self.linger()

    def send_400_response(self, msg: str) -> None:
        # httptools refused the request (or a callback above did): an envelope, not text.
        if self._too_large:
            limit = self.limits.max_header_bytes // 1024
            self.reject(431, f"the request line and headers are larger than {limit} KiB")
        elif self.phase == BODY:
            self.reject(400, "malformed HTTP request body (bad chunked encoding?)", "invalid_http")
        else:
            self.reject(400, "malformed HTTP request", "invalid_http")


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    *,
    drain_timeout_s: float,
    limits: LimitsSettings | ServerLimits | None = None,
    **extra: Any,
) -> uvicorn.Config:
    """uvicorn settings for both daemons: always the guarded httptools protocol."""
    if isinstance(limits, LimitsSettings):
        limits = limits.server_limits()
    limits = limits or ServerLimits()
    extra.pop("http", None)
    # Room to spare for upstream connections, model files and logs.
    fd_room = open_file_limit() * 3 // 4
    if limits.max_connections > fd_room:
        limits = dataclasses.replace(limits, max_connections=max(fd_room, 16))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(max(drain_timeout_s, 1)),
        timeout_keep_alive=30,
        http=GuardedProtocol,
        **extra,
    )
    config.helexa_limits = limits  # type: ignore[attr-defined]  # read by GuardedProtocol
    return config


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: ``on_drain`` when SIGTERM/SIGINT arrives, ``on_bound`` after bind,
    an optional ``drain`` phase, and exit status 0 after a graceful stop (uvicorn would
    re-raise the signal).

    ``drain`` runs after the signal and *before* uvicorn's shutdown, while the listener is
    still open: the app keeps answering (a neuron's /health says ``draining``, so cortex
    can tell a drain from a death) while it refuses new work and lets what runs finish.
    uvicorn's own shutdown (closing the listener, ``timeout_graceful_shutdown`` for the
    connections left) starts when it returns, or at once on a second SIGINT."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_drain: Callable[[], None],
        on_bound: Callable[[], None] | None = None,
        drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._on_bound = on_bound
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self._on_bound is not None:
            self._on_bound()

    async def main_loop(self) -> None:
        await super().main_loop()
        if self._drain is None or self.force_exit:
            return
        task = asyncio.ensure_future(self._drain())
        while not task.done() and not self.force_exit:
            await asyncio.wait({task}, timeout=0.1)
        if not task.done():  # a second SIGINT: stop waiting
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # the shutdown goes on whatever the drain did
            log.error("drain failed", extra={"error": repr(exc)}, exc_info=exc)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a drained stop is a clean exit: status 0
        if first:
            log.info("signal received: draining", extra={"signal": sig})
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_drain)
