"""A lean HTTP/1.1 client for talking to neurons: keep-alive pools, streamed bodies,
idle-read timeouts. cortex's hot path goes through here, so it does little per request:
one write for the request, httptools for the response, no per-request objects beyond
the response itself."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections import deque
from urllib.parse import urlsplit

import httptools


class UpstreamError(Exception):
    """The neuron could not be reached, or broke off, or stalled."""


class ConnectFailed(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class NeuronLost(UpstreamError):
    """The poller saw the neuron stop answering: requests waiting on it are cut."""


class GatewayShutdown(UpstreamError):
    """cortex itself ended the request: its own drain deadline passed (cortex.drain)."""


class LocalExhaustion(UpstreamError):
    """This process is out of file descriptors or sockets: not the neuron's fault."""


_LOCAL_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}


class _Connection(asyncio.Protocol):
    HIGH_WATER = 1 << 20  # pause reading when this much body is buffered

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reset()
        self.closed = False

    def reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop calls this after create_connection() returned (and its transports are not
        # asyncio.Transport subclasses), so _connect also sets it.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed response from neuron: {exc}"))
            return
        if self.buffered > self.HIGH_WATER and self.transport and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(UpstreamError(f"neuron closed the connection: {exc or 'EOF'}"))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- helpers ------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def abort(self, exc: BaseException) -> None:
        self._fail(exc)
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # races the waiter, and a cancelled proxy must stop waiting.
        try:
            async with asyncio.timeout(timeout):
                await self.waiter
        except TimeoutError:
            raise UpstreamTimeout(f"neuron sent nothing for {timeout:g}s") from None
        finally:
            self.waiter = None

    def take(self) -> bytes:
        data = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data


class Response:
    """A response whose body is read incrementally; ``close()`` returns the connection."""

    def __init__(self, pool: Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._released = False
        self._replay: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    async def next_chunk(self, idle_timeout: float | None) -> bytes | None:
        """The next piece of body, or None at the end; each wait is bounded by
        ``idle_timeout`` (a stalled neuron is cut, a long healthy stream is not)."""
        if self._replay is not None:
            chunk, self._replay = self._replay, None
            return chunk
        conn = self._conn
        while not conn.body:
            if conn.complete:
                return None
            if conn.error is not None:
                raise conn.error
            await conn.wait(idle_timeout)
        return conn.take()

    def abort(self, exc: UpstreamError) -> None:
        """End this answer now: what was received is still read, then ``exc`` is raised
        (the connection is closed, so the neuron stops generating)."""
        if not self._conn.complete:
            self._conn.abort(exc)

    def replay(self, data: bytes) -> None:
        """Hand ``data`` (already read) out again as the next chunk."""
        self._replay = data or None

    async def read(self, idle_timeout: float | None) -> bytes:
        parts = []
        while (chunk := await self.next_chunk(idle_timeout)) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        conn = self._conn
        self._pool.active.discard(conn)
        reusable = conn.complete and conn.keep_alive and conn.error is None and not conn.closed
        if reusable and not conn.paused and not conn.body:
            self._pool.put_back(conn)
        elif conn.transport is not None:
            conn.transport.close()


class Pool:
    """Keep-alive connections to one neuron."""

    def __init__(
        self,
        base_url: str,
        *,
        max_idle: int = 256,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self._default_lines = [name + b": " + value for name, value in headers or ()]
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        # An IPv6 literal goes in brackets (RFC 9110's Host), as in the URL it came from.
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = f"{host}:{self.port}".encode()
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self.active: set[_Connection] = set()  # lent out to a request or response

    def abort(self, reason: str) -> None:
        """Fail every request and response on this neuron now (it was seen dead)."""
        for conn in list(self.active):
            conn.abort(NeuronLost(reason))
        self.active.clear()
        self.close()

    def put_back(self, conn: _Connection) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):  # not wait_for: see _Connection.wait
                transport, conn = await loop.create_connection(_Connection, self.host, self.port)
        except OSError as exc:
            if exc.errno in _LOCAL_ERRNOS:
                raise LocalExhaustion(f"cannot open a connection here: {exc}") from exc
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except TimeoutError as exc:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        conn.transport = transport  # type: ignore[assignment]
        return conn

    def _encode(
        self, method: str, path: str, body: bytes | None, headers: list[tuple[bytes, bytes]] | None
    ) -> bytes:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self._host_header]
        lines += self._default_lines  # sent with every request (the neuron token)
        if body is not None:
            lines.append(b"Content-Type: application/json")
            lines.append(b"Content-Length: " + str(len(body)).encode())
        for name, value in headers or ():
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        connect_timeout: float = 3.0,
        header_timeout: float | None = None,
    ) -> Response:
        """Send a request and wait for the response head. A reused connection that the
        neuron had already closed is retried once on a fresh one (nothing was received)."""
        payload = self._encode(method, path, body, headers)
        for attempt in (0, 1):
            conn = None
            while self._idle and conn is None:
                candidate = self._idle.pop()
                if not candidate.closed:
                    conn = candidate
            reused = conn is not None
            if conn is None:
                conn = await self._connect(connect_timeout)
            conn.reset()
            assert conn.transport is not None
            self.active.add(conn)
            conn.transport.write(payload)
            try:
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(header_timeout)
            except (UpstreamTimeout, NeuronLost):
                self._drop(conn)
                raise
            except UpstreamError:
                self._drop(conn)
                if reused and not conn.got_bytes and attempt == 0:
                    continue
                raise
            except BaseException:  # cancelled: the connection is mid-request, drop it
                self._drop(conn)
                raise
            return Response(self, conn)
        raise UpstreamError("unreachable")  # pragma: no cover

    def _drop(self, conn: _Connection) -> None:
        self.active.discard(conn)
        if conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                with contextlib.suppress(Exception):
                    conn.transport.close()
        self._idle.clear()
