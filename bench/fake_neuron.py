"""A minimal, very fast fake neuron: the neuron's HTTP API shapes with no model behind them.

Raw asyncio Protocol + httptools + uvloop, HTTP/1.1 keep-alive, no framework, so that a
gateway benchmark measures the gateway and not the upstream.

    .venv/bin/python bench/fake_neuron.py --port 9100 [--model bench/fake] [--chunks 20] \
        [--chunk-interval-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time
from collections import deque
from typing import Any, cast

import httptools
import orjson
import uvloop

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}
_NOT_FOUND = {
    "error": {"message": "not found", "type": "not_found_error", "code": "not_found", "param": None}
}
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"
_USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


class Config:
    """What the fake serves; JSON for the static GET routes is encoded once at startup."""

    def __init__(self, model: str, chunks: int, chunk_interval_s: float) -> None:
        self.model = model
        self.chunks = chunks
        self.chunk_interval_s = chunk_interval_s
        self.started = time.monotonic()
        self.ids = itertools.count()
        self.static: dict[tuple[bytes, bytes], bytes] = {
            (b"GET", b"/discovery"): orjson.dumps(
                {
                    "hostname": "fake",
                    "os": "fake",
                    "kernel": "fake",
                    "cuda_version": None,
                    "driver_version": None,
                    "devices": [
                        {
                            "index": 0,
                            "name": "Fake GPU",
                            "vram_total_mb": 24000,
                            "compute_capability": "8.9",
                        }
                    ],
                    "cpu": {"cores": 2, "memory_total_mb": 16000},
                    "harnesses": ["transformers"],
                }
            ),
            (b"GET", b"/models"): orjson.dumps(
                [
                    {
                        "id": model,
                        "harness": "transformers",
                        "status": "loaded",
                        "devices": [0],
                        "vram_used_mb": 1000,
                        "context_length": 4096,
                    }
                ]
            ),
            (b"GET", b"/v1/models"): orjson.dumps(
                {
                    "object": "list",
                    "data": [{"id": model, "object": "model", "created": 0, "owned_by": "fake"}],
                }
            ),
            (b"POST", b"/models/load"): orjson.dumps({"status": "loaded"}),
            (b"POST", b"/models/unload"): orjson.dumps({"status": "unloaded"}),
        }

    def health(self) -> bytes:
        return orjson.dumps(
            {
                "uptime_secs": round(time.monotonic() - self.started, 3),
                "devices": [
                    {
                        "index": 0,
                        "vram_used_mb": 1000,
                        "vram_free_mb": 23000,
                        "utilization_pct": 0,
                        "temp_c": 40,
                    }
                ],
                "cpu": {"memory_used_mb": 0, "memory_free_mb": 12000},
                "activation": {
                    "state": "ready",
                    "pending": [],
                    "in_progress": None,
                    "completed": [self.model],
                    "failed": [],
                },
                "models": {self.model: {"in_flight": 0, "queued": 0}},
            }
        )


def _response(status: int, body: bytes, keep_alive: bool) -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        status,
        _REASONS[status],
        len(body),
    )
    return head + (b"\r\n" if keep_alive else b"connection: close\r\n\r\n") + body


def _sse(obj: Any) -> bytes:
    """One SSE event framed as one HTTP chunk."""
    data = b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class FakeNeuron(asyncio.Protocol):
    """One keep-alive connection; pipelined requests wait while a stream is being written."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.pending: deque[tuple[bytes, bytes, bytes, bool]] = deque()
        self.stream_task: asyncio.Task[None] | None = None

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, so cast, don't check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._send(_response(400, b'{"error":{"message":"bad request"}}', False), False)

    def connection_lost(self, exc: Exception | None) -> None:
        # Client went away: stop streaming to it.
        if self.stream_task is not None:
            self.stream_task.cancel()
        self.transport = None

    # --- httptools callbacks ---
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        req = (
            self.parser.get_method(),
            self.url.split(b"?", 1)[0],
            b"".join(self.body),
            self.parser.should_keep_alive(),
        )
        if self.stream_task is not None:
            self.pending.append(req)
        else:
            self._handle(*req)

    # --- routing ---
    def _send(self, data: bytes, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if not keep_alive:
            self.transport.close()

    def _handle(self, method: bytes, path: bytes, body: bytes, keep_alive: bool) -> None:
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            self._completion(path == b"/v1/chat/completions", body, keep_alive)
            return
        if method == b"GET" and path == b"/health":
            self._send(_response(200, self.cfg.health(), keep_alive), keep_alive)
            return
        static = self.cfg.static.get((method, path))
        if static is None:
            self._send(_response(404, orjson.dumps(_NOT_FOUND), keep_alive), keep_alive)
        else:
            self._send(_response(200, static, keep_alive), keep_alive)

    def _completion(self, chat: bool, body: bytes, keep_alive: bool) -> None:
        try:
            req = orjson.loads(body)
            if not isinstance(req, dict):
                raise ValueError("body is not an object")
        except ValueError:
            err = {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}}
            self._send(_response(400, orjson.dumps(err), keep_alive), keep_alive)
            return
        model = req.get("model") or self.cfg.model
        n = next(self.cfg.ids)
        created = int(time.time())
        if req.get("stream"):
            opts = req.get("stream_options") or {}
            usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            self.stream_task = asyncio.get_running_loop().create_task(
                self._stream(chat, model, n, created, usage, keep_alive)
            )
            return
        text = "tok tok tok tok tok"
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": "length",
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        out = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-fake{n}",
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": _USAGE,
        }
        self._send(_response(200, orjson.dumps(out), keep_alive), keep_alive)

    async def _stream(
        self, chat: bool, model: str, n: int, created: int, usage: bool, keep_alive: bool
    ) -> None:
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-fake{n}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                d: dict[str, Any] = {} if delta is None else {"content": delta}
                if delta == "":  # the opening chunk, as the neuron sends it
                    d = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {
                    "index": 0,
                    "text": delta or "",
                    "logprobs": None,
                    "finish_reason": finish,
                }
            return {**base, "choices": [choice]}

        try:
            head = _SSE_HEAD + (b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
            self._write(head + _sse(chunk("", None)))
            content = _sse(chunk("tok ", None))  # identical every step: encode once
            for _ in range(self.cfg.chunks):
                await asyncio.sleep(self.cfg.chunk_interval_s)
                self._write(content)
            self._write(_sse(chunk(None, "length")))
            if usage:
                self._write(_sse({**base, "choices": [], "usage": _USAGE}))
            self._write(_sse(b"[DONE]") + _LAST_CHUNK)
        except ConnectionError:
            return
        finally:
            self.stream_task = None
        if not keep_alive:
            self._send(b"", False)
            return
        while self.pending and self.stream_task is None and self.transport is not None:
            self._handle(*self.pending.popleft())

    def _write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("client disconnected")
        self.transport.write(data)


async def serve(host: str, port: int, cfg: Config) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeNeuron(cfg), host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake neuron listening on http://{host}:{port} model={cfg.model}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="bench/fake")
    ap.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    ap.add_argument("--chunk-interval-ms", type=float, default=5.0)
    args = ap.parse_args()
    cfg = Config(args.model, args.chunks, args.chunk_interval_ms / 1000.0)
    uvloop.run(serve(args.host, args.port, cfg))


if __name__ == "__main__":
    main()
