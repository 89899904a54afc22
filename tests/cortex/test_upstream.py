"""The upstream client and the stream tap, against small loopback servers."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from helexa.cortex.access import outcome
from helexa.cortex.protocols import PassthroughCodec, StreamTap
from helexa.cortex.relay import neuron_error
from helexa.cortex.upstream import ConnectFailed, Pool, UpstreamError, UpstreamTimeout
from tests.support.procs import free_port


async def serve(handler) -> tuple[asyncio.AbstractServer, str]:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def test_keep_alive_chunked_stream_and_idle_timeout() -> None:
    async def scenario() -> None:
        connections = 0

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            while True:
                try:
                    request = await read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                if b"/stall" in request:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
                    )
                    await writer.drain()
                    await asyncio.sleep(5)
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(b"2\r\nde\r\n0\r\n\r\n")
                await writer.drain()

        server, base = await serve(handler)
        pool = Pool(base)
        for _ in range(3):
            response = await pool.request("POST", "/x", b"{}", header_timeout=2)
            assert response.status == 200
            assert await response.read(2) == b"abcde"
            response.close()
        assert connections == 1  # one keep-alive connection for all three
        stalled = await pool.request("GET", "/stall", header_timeout=2)
        assert await stalled.next_chunk(1) == b"hello"
        with pytest.raises(UpstreamTimeout):
            await stalled.next_chunk(0.2)
        stalled.close()
        server.close()

    asyncio.run(scenario())


def test_stale_keep_alive_connection_is_retried_and_refusal_reported() -> None:
    async def scenario() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()  # the server drops keep-alive without saying so

        server, base = await serve(handler)
        pool = Pool(base)
        for _ in range(3):
            response = await pool.request("GET", "/", header_timeout=2)
            assert await response.read(2) == b"ok"
            response.close()
        server.close()
        with pytest.raises(ConnectFailed):
            await Pool(f"http://127.0.0.1:{free_port()}").request("GET", "/")

        async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
            writer.close()

        server, base = await serve(broken)
        response = await Pool(base).request("GET", "/", header_timeout=2)
        with pytest.raises(UpstreamError):
            await response.read(2)
        server.close()

    asyncio.run(scenario())


def test_stream_tap_strips_unrequested_usage_and_rejoins_split_events() -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    final = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    tap = StreamTap(keep_usage=False)
    out = tap.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
    assert tap.first_token_at is None and out.startswith(b"data: ")
    assert tap.feed(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: {"cho') == (
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    )
    assert tap.first_token_at is not None
    rest = tap.feed(b'ices":[{"delta":{"content":"!"}}]}\n\n' + final + usage + b"data: [DONE]\n\n")
    assert b'"usage"' not in rest and rest.endswith(b"data: [DONE]\n\n") and final in rest
    assert tap.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    keeper = StreamTap(keep_usage=True)
    assert keeper.feed(final + usage) == final + usage


def test_how_a_relayed_stream_ended_is_known_for_the_log_and_metrics() -> None:
    """The codec says why a stream did not finish: the neuron's own error event (its
    code), a body that ended with neither [DONE] nor an error (then the client gets an
    error event: never a silent end), or cortex's own failure; ``outcome`` words it."""
    role = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    whole = PassthroughCodec(keep_usage=False)
    whole.feed(role + b'data: {"choices":[{"delta":{"content":"data: [DONE]"}}]}\n\n')
    assert not whole.tap.done  # the text of a content string is not the end
    whole.feed(b"data: [DONE]\n\n")
    assert whole.end() == b"" and whole.error is None

    cut = PassthroughCodec(keep_usage=False)
    cut.feed(role)
    out, _done = cut.feed(
        b'data: {"error":{"message":"drain","type":"service_unavailable",'
        b'"code":"shutting_down","param":null}}\n\n'
    )
    assert out.startswith(b'data: {"error"')  # passed through as it is
    assert cut.end() == b"" and cut.error == "shutting_down"

    silent = PassthroughCodec(keep_usage=False)
    silent.feed(role)
    tail = silent.end()
    assert silent.error == "upstream_broken"
    assert orjson.loads(tail.removeprefix(b"data: "))["error"]["code"] == "upstream_broken"

    failed = PassthroughCodec(keep_usage=False)
    failed.fail(503, "cortex is shutting down", "shutting_down")
    assert failed.error == "shutting_down"

    assert neuron_error({"message": "m", "type": "service_unavailable", "code": "x"}) == (
        503,
        "m",
        "x",
    )
    assert neuron_error(None) == (500, "generation failed", "upstream_error")
    assert outcome(200, None) == "ok"
    assert outcome(200, "upstream_broken") == "broken"
    assert outcome(200, "client_disconnected") == "abandoned"
    assert outcome(503, "upstream_timeout") == "error"
    assert outcome(499, "client_disconnected") == "abandoned"


@pytest.mark.parametrize(
    ("endpoint", "host"),
    [
        ("http://[::1]:13131", b"Host: [::1]:13131"),
        ("http://[fe80::1]:80", b"Host: [fe80::1]:80"),
        ("http://beast.internal:13131", b"Host: beast.internal:13131"),
        ("http://10.0.0.2", b"Host: 10.0.0.2:80"),
    ],
)
def test_host_header_brackets_ipv6_literals(endpoint: str, host: bytes) -> None:
    request = Pool(endpoint)._encode("GET", "/health", None, None)
    assert request.split(b"\r\n")[1] == host
