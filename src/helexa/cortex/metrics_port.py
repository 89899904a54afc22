"""The metrics port (§2.9): Prometheus text for whoever scrapes it, served on cortex's own
event loop.

prometheus-client's own server gives every connection a thread and never times one out (400
idle connections held 406 threads). Here a connection costs no thread: it gets one answer,
has ``timeout_s`` to send its request and read that answer, and beyond ``max_connections``
still sending theirs, the one that has waited longest is closed.
"""

from __future__ import annotations

import asyncio
import socket

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from helexa.core.browser import host_allowed

MAX_HEAD = 16 * 1024  # a scrape's request line and headers are far smaller
PATHS = frozenset({"/metrics", "/"})


def _host_header(head: bytes) -> str | None:
    for raw in head.split(b"\r\n")[1:]:
        name, _, value = raw.partition(b":")
        if name.strip().lower() == b"host":
            return value.strip().decode("latin-1")
    return None


def response_for(
    head: bytes, registry: CollectorRegistry, hosts: frozenset[str] | None = None
) -> tuple[int, bytes, bytes]:
    """(status, content type, body) for a request whose line and headers are ``head``;
    ``hosts``: the names this port answers to (DNS rebinding must not read it either)."""
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) != 3 or not line[2].startswith(b"HTTP/"):
        return 400, b"text/plain", b"malformed request\n"
    if hosts is not None and not host_allowed(_host_header(head), hosts):
        return 421, b"text/plain", b"unknown host name: add it to [http] allowed_hosts\n"
    method, target = line[0], line[1].split(b"?", 1)[0].decode("latin-1")
    if method not in (b"GET", b"HEAD"):
        return 405, b"text/plain", b"only GET and HEAD\n"
    if target not in PATHS:
        return 404, b"text/plain", b"metrics are at /metrics\n"
    return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(registry)


REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    421: b"Misdirected Request",
}


def render(status: int, content_type: bytes, body: bytes, *, head_only: bool = False) -> bytes:
    start = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
        status,
        REASONS[status],
        content_type,
        len(body),
    )
    return start + b"connection: close\r\n\r\n" + (b"" if head_only else body)


class MetricsPort:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        timeout_s: float = 10.0,
        max_connections: int = 64,
        hosts: frozenset[str] | None = None,
    ) -> None:
        self.registry = registry
        self.hosts = hosts
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        # Connections still sending their request, oldest first: the ones shed at the cap.
        self.waiting: dict[asyncio.StreamWriter, None] = {}
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None

    def bind(self, host: str, port: int) -> None:
        """Take the port now (an OSError if it cannot be had); serving starts in ``start``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=128)

    async def start(self) -> None:
        if self._sock is not None and self._server is None:
            self._server = await asyncio.start_server(self._serve, sock=self._sock, limit=MAX_HEAD)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        elif self._sock is not None:
            self._sock.close()
        self._sock = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.waiting) >= self.max_connections:
            # The one that has waited longest goes, so idle connections cannot lock the
            # scraper out.
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.transport.abort()
        self.waiting[writer] = None
        try:
            async with asyncio.timeout(self.timeout_s):
                head = await reader.readuntil(b"\r\n\r\n")
                self.waiting.pop(writer, None)
                # Off the event loop: a large registry takes a while to render.
                answer = await asyncio.to_thread(response_for, head, self.registry, self.hosts)
                writer.write(render(*answer, head_only=head.startswith(b"HEAD ")))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            # Silent, slow, oversized or gone: dropped at once, whatever is unsent with it.
            writer.transport.abort()
        else:
            writer.close()
        finally:
            self.waiting.pop(writer, None)
