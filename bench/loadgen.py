"""A cheap closed-loop HTTP/1.1 load generator: one keep-alive connection per worker.

Raw asyncio Protocol + httptools response parser (chunked handled by httptools), so the
client costs a few tens of microseconds per request and leaves the CPU to the servers
under test.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import cast

import httptools
import orjson

_TAIL = 64  # bytes kept across body pieces so markers split between reads are still seen
_DETAIL = 400  # bytes of an error response kept for the report


@dataclass(frozen=True)
class Format:
    """How one kind of response is validated and timed (all markers are byte substrings)."""

    stream: bool
    first: bytes = b""  # stream: the first content event; timed when first seen
    last: bytes = b""  # stream: the last event; timed when first seen
    end: bytes = b""  # stream: the body must end with this (trailing whitespace aside)
    error: bytes = b""  # stream: seen anywhere, the response counts as an error
    json_type: str = ""  # non-stream: the JSON body's "type" must be this


# OpenAI chat SSE: content deltas carry "tok " (the role chunk has empty content, ids are
# hex); cortex reports a broken upstream as a `data: {"error": ...}` event.
OPENAI_STREAM = Format(
    stream=True, first=b'"tok ', last=b"data: [DONE]", end=b"data: [DONE]", error=b'data: {"error"'
)
OPENAI_JSON = Format(stream=False)
# Anthropic Messages SSE: ... content_block_delta* ... message_delta, message_stop.
ANTHROPIC_STREAM = Format(
    stream=True,
    first=b"event: content_block_delta",
    last=b"event: message_stop",
    end=b'data: {"type":"message_stop"}',
    error=b"event: error",
)
ANTHROPIC_JSON = Format(stream=False, json_type="message")


@dataclass
class Result:
    """Samples of one run (one scenario, one target, one round), times in ns."""

    elapsed_ns: int = 0
    ok: int = 0
    errors: int = 0
    latency_ns: list[int] = field(default_factory=list)  # to response end / [DONE]
    first_ns: list[int] = field(default_factory=list)  # to first content chunk (streams)
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)  # first few error bodies

    def error(self, kind: str, detail: str = "") -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
        if len(self.error_samples) < 3:
            self.error_samples.append(f"{kind}: {detail}" if detail else kind)

    def merge(self, other: Result) -> None:
        self.elapsed_ns += other.elapsed_ns
        self.ok += other.ok
        self.errors += other.errors
        self.latency_ns += other.latency_ns
        self.first_ns += other.first_ns
        for k, v in other.error_kinds.items():
            self.error_kinds[k] = self.error_kinds.get(k, 0) + v
        self.error_samples += other.error_samples[: max(0, 3 - len(self.error_samples))]


def percentile(samples: list[int], q: float) -> float:
    """Nearest-rank percentile; NaN for no samples."""
    if not samples:
        return math.nan
    s = sorted(samples)
    return float(s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))])


def build_request(host: str, port: int, path: str, body: dict[str, object]) -> bytes:
    data = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


class _Conn(asyncio.Protocol):
    """One client connection; one request in flight at a time."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, int, int, str, str]] | None = None
        self.alive = True
        self.status = 0
        self.tail = b""
        self.body: list[bytes] = []  # whole body, only where it is checked as JSON
        self.detail = b""  # error text kept for the report
        self.saw_error = False
        self.t_first = 0
        self.t_done = 0

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail("parse")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("disconnect")

    # --- httptools callbacks ---
    def on_message_begin(self) -> None:
        self.status = 0
        self.tail = b""
        self.body = []
        self.detail = b""
        self.saw_error = False
        self.t_first = 0
        self.t_done = 0

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        fmt = self.fmt
        if self.status != 200 or self.saw_error:
            if len(self.detail) < _DETAIL:
                self.detail += body
            return
        buf = self.tail + body
        if fmt.stream:
            if not self.t_first and fmt.first in buf:
                self.t_first = time.perf_counter_ns()
            if not self.t_done and fmt.last in buf:
                self.t_done = time.perf_counter_ns()
            if fmt.error and fmt.error in buf:
                self.saw_error = True
                self.detail = buf[buf.index(fmt.error) :]
        elif fmt.json_type:
            self.body.append(body)
        self.tail = buf[-_TAIL:]

    def on_message_complete(self) -> None:
        now = time.perf_counter_ns()
        if not self.parser.should_keep_alive():
            self.alive = False
        fmt = self.fmt
        err = ""
        if self.status != 200:
            err = f"http {self.status}"
        elif fmt.stream:
            if self.saw_error:
                err = "error event"
            elif not self.tail.rstrip().endswith(fmt.end):
                err = f"no {fmt.end.decode()}"
                self.detail = self.tail
            elif not self.t_first:
                err = "no content"
        elif fmt.json_type:
            raw = b"".join(self.body)
            try:
                doc = orjson.loads(raw)
                ok = isinstance(doc, dict) and doc.get("type") == fmt.json_type
            except orjson.JSONDecodeError:
                ok = False
            if not ok:
                err = f"not a {fmt.json_type}"
                self.detail = raw[:_DETAIL]
        elif not self.tail:
            err = "empty body"
        detail = self.detail[:_DETAIL].decode(errors="replace") if err else ""
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result((self.t_first, self.t_done or now, now, err, detail))

    # --- client side ---
    def _fail(self, kind: str) -> None:
        self.alive = False
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_exception(ConnectionError(kind))
        if self.transport is not None:
            self.transport.close()

    def send(self, request: bytes) -> asyncio.Future[tuple[int, int, int, str, str]]:
        assert self.transport is not None
        fut: asyncio.Future[tuple[int, int, int, str, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self.waiter = fut
        self.transport.write(request)
        return fut


@dataclass
class _Budget:
    deadline_ns: int
    remaining: int  # requests left to start; negative means unlimited


async def _worker(
    host: str, port: int, request: bytes, fmt: Format, budget: _Budget, res: Result
) -> None:
    loop = asyncio.get_running_loop()
    conn: _Conn | None = None
    try:
        while time.perf_counter_ns() < budget.deadline_ns and budget.remaining != 0:
            if conn is None or not conn.alive:
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                try:
                    _, conn = await loop.create_connection(lambda: _Conn(fmt), host, port)
                except OSError:
                    res.error("connect")
                    conn = None
                    await asyncio.sleep(0.05)  # don't spin on a dead target
                    continue
            budget.remaining -= 1
            t0 = time.perf_counter_ns()
            try:
                t_first, t_done, _, err, detail = await conn.send(request)
            except ConnectionError as e:
                res.error(str(e) or "disconnect")
                continue
            if err:
                res.error(err, detail)
                continue
            res.ok += 1
            res.latency_ns.append(t_done - t0)
            if fmt.stream:
                res.first_ns.append(t_first - t0)
    finally:
        if conn is not None and conn.transport is not None:
            conn.transport.close()


async def run_load(
    host: str,
    port: int,
    request: bytes,
    *,
    fmt: Format,
    concurrency: int,
    duration_s: float,
    max_requests: int = 0,
    grace_s: float = 10.0,
) -> Result:
    """Closed loop: `concurrency` workers send back to back until the time or request budget
    runs out. Requests still unanswered `grace_s` after the deadline count as errors."""
    res = Result()
    t0 = time.perf_counter_ns()
    budget = _Budget(t0 + int(duration_s * 1e9), max_requests if max_requests > 0 else -1)
    tasks = [
        asyncio.ensure_future(_worker(host, port, request, fmt, budget, res))
        for _ in range(concurrency)
    ]
    # One watchdog for the whole run instead of a per-request timeout (cheaper).
    _, late = await asyncio.wait(tasks, timeout=duration_s + grace_s)
    for t in late:
        t.cancel()
        res.error("timeout")
    if late:
        await asyncio.wait(late)
    res.elapsed_ns = time.perf_counter_ns() - t0
    return res
