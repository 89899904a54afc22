"""Request limits and HTTP hardening of a real cortex (§2.8.1): body size, counts, JSON
depth, model names, header/body read timeouts, header size, a connection cap that keeps
/health answering; every error a whole response in the protocol's own envelope."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import anthropic
import httpx
import openai
import pytest

from tests.cortex.conftest import Fleet
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon

MODEL = "scripted/qwen"
USER = [{"role": "user", "content": "hi"}]
LIMITS = """[limits]
max_body_mb = 1
body_timeout_s = 1
header_timeout_s = 1
max_header_kb = 8
max_connections = 64
"""


@dataclass
class Guarded:
    base: str
    host: str
    port: int
    metrics: str
    cortex: Daemon


@pytest.fixture(scope="module")
def guarded(scripted: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    """A cortex with small limits and short timeouts, in front of the scripted neuron."""
    work = tmp_path_factory.mktemp("limits")
    models = (
        f'[[models]]\nid = "{MODEL}"\nvram_mb = 1\nmin_devices = 0\n'
        f'[fallbacks]\n"claude-*" = "{MODEL}"\n'
    )
    neuron_url = scripted.neurons["scripted"][1]
    cortex, base, metrics = start_cortex(
        work, {"scripted": neuron_url}, models, extra=LIMITS, name="limits"
    )
    parts = urlsplit(base)
    assert parts.hostname is not None and parts.port is not None
    yield Guarded(base, parts.hostname, parts.port, metrics, cortex)
    cortex.stop()


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}
    return error


def anthropic_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth - 1):
        value = [value]
    return value


# --- raw HTTP ---------------------------------------------------------------------------------


def connect(g: Guarded) -> socket.socket:
    sock = socket.create_connection((g.host, g.port), timeout=10)
    return sock


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes; a reset fails the test."""
    sock.settimeout(timeout)
    out = b""
    while True:
        chunk = sock.recv(65536)  # ConnectionResetError would mean a reset, not a close
        if not chunk:
            return out
        out += chunk


def parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        whole = b""
        while True:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            whole, body = whole + body[:size], body[size + 2 :]
        return status, headers, json.loads(whole)
    length = int(headers["content-length"])
    assert len(body) == length, "the answer must be whole"
    return status, headers, json.loads(body)


# --- body size ---------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_in_each_envelope(guarded: Guarded) -> None:
    big = "x" * (1024 * 1024 + 10)
    response = httpx.post(
        f"{guarded.base}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": big}]},
        timeout=30,
    )
    error = openai_error(response, 413)
    assert error["code"] == "request_too_large" and "1 MiB" in error["message"]
    response = httpx.post(
        f"{guarded.base}/v1/messages",
        json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": big}]},
        timeout=30,
    )
    assert anthropic_error(response, 413)["type"] == "request_too_large"


def test_a_chunked_body_is_counted_while_it_is_read(guarded: Guarded) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting can stop it
        yield b'{"model": "' + MODEL.encode() + b'", "pad": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    response = httpx.post(
        f"{guarded.base}/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert openai_error(response, 413)["code"] == "request_too_large"


def test_the_sdks_see_413(guarded: Guarded) -> None:
    big = "z" * (2 * 1024 * 1024)
    client = anthropic.Anthropic(base_url=guarded.base, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": big}]
        )
    assert info.value.status_code == 413
    oai = openai.OpenAI(base_url=f"{guarded.base}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as oinfo:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": big}])
    assert oinfo.value.status_code == 413


def test_a_declared_length_over_the_limit_is_refused_before_the_body(guarded: Guarded) -> None:
    """Content-Length over the limit: the 413 comes before a byte of the body is sent, then
    a clean close (a FIN, not a reset), though the client never sent the body."""
    sock = connect(guarded)
    sock.sendall(
        b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: 50000000\r\n\r\n"
    )
    status, headers, body = parse(read_all(sock))
    sock.close()
    assert status == 413 and headers["connection"] == "close"
    assert body["type"] == "error" and body["error"]["type"] == "request_too_large"


def test_an_oversized_body_sent_whole_still_gets_its_answer(guarded: Guarded) -> None:
    """The client sends all 3 MiB before reading: it still reads the whole 413."""
    sock = connect(guarded)
    payload = b"q" * (3 * 1024 * 1024)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n"
    )
    with contextlib.suppress(OSError):  # the server may stop reading after its answer
        sock.sendall(payload)
    status, _headers, body = parse(read_all(sock))
    sock.close()
    assert status == 413 and body["error"]["code"] == "request_too_large"


# --- JSON depth and counts ---------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 300, 1000])
def test_deep_json_is_400_not_500(guarded: Guarded, depth: int) -> None:
    deep = "[" * depth + "1" + "]" * depth
    raw = f'{{"model": "{MODEL}", "max_tokens": 5, "messages": [], "metadata": {deep}}}'
    for path, shape in [("/v1/chat/completions", openai_error), ("/v1/messages", None)]:
        response = httpx.post(
            f"{guarded.base}{path}",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=10,
        )
        if shape is None:
            error = anthropic_error(response, 400)
            assert "deeper than 64" in error["message"] or "malformed" in error["message"]
        else:
            assert shape(response, 400)["code"] == "invalid_json"


def test_a_body_at_the_depth_bound_passes(guarded: Guarded) -> None:
    body = {"model": MODEL, "max_tokens": 5, "messages": USER, "metadata": {"x": nested(60)}}
    response = httpx.post(f"{guarded.base}/v1/messages/count_tokens", json=body, timeout=10)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("messages", USER * 10_001),
        ("tools", [{"name": f"t{i}", "input_schema": {"type": "object"}} for i in range(513)]),
        ("stop_sequences", ["s"] * 17),
    ],
)
def test_anthropic_counts_are_bounded(guarded: Guarded, field: str, value: list) -> None:
    body = {"model": MODEL, "max_tokens": 5, "messages": USER, field: value}
    response = httpx.post(f"{guarded.base}/v1/messages", json=body, timeout=30)
    error = anthropic_error(response, 400)
    assert error["type"] == "invalid_request_error" and field in error["message"]


def test_responses_counts_are_bounded(guarded: Guarded) -> None:
    items = [{"role": "user", "content": "x"}] * 10_001
    response = httpx.post(
        f"{guarded.base}/v1/responses", json={"model": MODEL, "input": items}, timeout=30
    )
    assert openai_error(response, 400)["param"] == "input"


# --- model names -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a\x00b", "x" * 256, "a\x07b"])
def test_client_model_names_are_names(guarded: Guarded, name: str) -> None:
    response = httpx.post(
        f"{guarded.base}/v1/chat/completions",
        json={"model": name, "messages": USER},
        timeout=10,
    )
    error = openai_error(response, 400)
    assert error["param"] == "model" and "invalid model name" in error["message"]
    response = httpx.post(
        f"{guarded.base}/v1/messages",
        json={"model": name, "max_tokens": 5, "messages": USER},
        timeout=10,
    )
    anthropic_error(response, 400)


def test_a_fallback_still_maps_real_names(guarded: Guarded) -> None:
    for name in ("claude-sonnet-4-5", "claude-sonnet-4-5[1m]"):
        body = {"model": name, "max_tokens": 5, "messages": USER}
        response = httpx.post(f"{guarded.base}/v1/messages/count_tokens", json=body, timeout=10)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("name", ["scripted/qw?n", "scripted/*", "../scripted/qwen"])
def test_a_client_name_is_looked_up_never_matched_as_a_pattern(guarded: Guarded, name: str) -> None:
    response = httpx.post(
        f"{guarded.base}/v1/chat/completions", json={"model": name, "messages": USER}, timeout=10
    )
    assert openai_error(response, 404)["code"] == "model_not_found"


@pytest.mark.parametrize("name", ["a\x00b", "x" * 300, "org/*", "org/[ab]"])
def test_admin_model_ids_are_validated(guarded: Guarded, name: str) -> None:
    for route in ("load", "unload"):
        response = httpx.post(
            f"{guarded.base}/admin/models/{route}", json={"model_id": name}, timeout=10
        )
        assert openai_error(response, 400)["param"] == "model_id"


# --- methods and paths ------------------------------------------------------------------------


def test_wrong_method_speaks_the_routes_protocol(guarded: Guarded) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        response = httpx.get(f"{guarded.base}{path}", timeout=10)
        assert anthropic_error(response, 405)["type"] == "invalid_request_error"
        assert response.headers.get("allow") == "POST"
    assert openai_error(httpx.get(f"{guarded.base}/v1/chat/completions"), 405)
    error = openai_error(httpx.get(f"{guarded.base}/v1/messages/nope"), 404)
    assert error["type"] == "not_found_error"
    openai_error(httpx.post(f"{guarded.base}/nowhere", json={}), 404)


# --- slow and half-sent clients ----------------------------------------------------------------


def test_headers_sent_a_byte_at_a_time_are_cut_off(guarded: Guarded) -> None:
    sock = connect(guarded)
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"a" * 200
    started = time.monotonic()
    raw = b""
    sock.settimeout(0.2)
    for byte in request:
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        try:
            raw = sock.recv(65536)
        except TimeoutError:
            continue
        break
    raw += read_all(sock)
    sock.close()
    assert time.monotonic() - started < 15
    status, headers, body = parse(raw)
    assert status == 408 and headers["connection"] == "close"
    assert body["error"]["code"] == "request_timeout"


def test_a_silent_connection_is_closed(guarded: Guarded) -> None:
    sock = connect(guarded)
    assert read_all(sock) == b""  # closed after the header timeout; nothing to answer
    sock.close()


@pytest.mark.parametrize(
    ("path", "anthropic_shape"), [("/v1/chat/completions", False), ("/v1/messages", True)]
)
def test_a_body_that_stops_coming_is_408(
    guarded: Guarded, path: str, anthropic_shape: bool
) -> None:
    sock = connect(guarded)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        "content-length: 1000\r\n\r\n".encode()
        + b'{"model": "scripted/qwen", '
    )
    status, headers, body = parse(read_all(sock))
    sock.close()
    assert status == 408 and headers["connection"] == "close"
    if anthropic_shape:
        assert body["type"] == "error" and "did not arrive" in body["error"]["message"]
    else:
        assert body["error"]["code"] == "request_timeout"


def test_oversized_headers_are_431(guarded: Guarded) -> None:
    response = httpx.post(
        f"{guarded.base}/v1/messages",
        headers={"x-big": "b" * (9 * 1024)},
        json={"model": MODEL, "max_tokens": 5, "messages": USER},
        timeout=10,
    )
    assert anthropic_error(response, 431)["type"] == "request_too_large"
    sock = connect(guarded)  # headers that never end, sent as fast as they come
    with contextlib.suppress(OSError):
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n" + b"x-pad: " + b"p" * 20000)
    status, _headers, body = parse(read_all(sock))
    sock.close()
    assert status == 431 and body["error"]["code"] == "request_header_fields_too_large"


def test_half_sent_requests_cannot_starve_health(guarded: Guarded) -> None:
    """200 connections that never finish their headers (or their body), against a cap of
    64: the longest-waiting are shed, /health still answers at once."""
    held: list[socket.socket] = []
    try:
        for index in range(200):
            sock = connect(guarded)
            if index % 2:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nx-a: ")
            else:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                    b"content-length: 500\r\n\r\n{"
                )
            held.append(sock)
        for _ in range(5):
            response = httpx.get(f"{guarded.base}/health", timeout=5)
            assert response.status_code == 200
    finally:
        for sock in held:
            sock.close()
    # And the cortex serves normally afterwards.
    body = {"model": MODEL, "max_tokens": 5, "messages": USER}
    assert httpx.post(f"{guarded.base}/v1/messages/count_tokens", json=body).status_code == 200


@pytest.mark.parametrize(
    ("path", "anthropic_shape"), [("/v1/chat/completions", False), ("/v1/messages", True)]
)
def test_a_bad_chunk_size_is_400(guarded: Guarded, path: str, anthropic_shape: bool) -> None:
    """A chunked body whose chunk size is not hex: an answer, not a closed connection."""
    sock = connect(guarded)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        'transfer-encoding: chunked\r\n\r\n5\r\n{"a":\r\nzz\r\n1}\r\n0\r\n\r\n'.encode()
    )
    status, headers, body = parse(read_all(sock))
    sock.close()
    assert status == 400 and headers["connection"] == "close"
    if anthropic_shape:
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["code"] == "invalid_http"
    assert httpx.get(f"{guarded.base}/health").status_code == 200


def threads(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/task"))


def test_idle_metrics_connections_cost_no_thread_and_time_out(guarded: Guarded) -> None:
    """prometheus-client's server held a thread per connection, forever (400 idle
    connections: 406 threads). Now: no thread each, closed after header_timeout_s (1 s)."""
    parts = urlsplit(guarded.metrics)
    assert parts.hostname is not None and parts.port is not None
    before = threads(guarded.cortex)
    held = [socket.create_connection((parts.hostname, parts.port), timeout=10) for _ in range(200)]
    try:
        time.sleep(0.3)
        assert threads(guarded.cortex) < before + 10
        scraped = httpx.get(f"{guarded.metrics}/metrics", timeout=5)
        assert scraped.status_code == 200 and "cortex_neuron_up" in scraped.text
        assert scraped.headers["content-type"].startswith("text/plain")
        started = time.monotonic()
        # Past the cap (64 at once) or idle for the timeout: closed, never answered.
        for sock in held[:20]:
            assert read_all(sock) == b""
        assert time.monotonic() - started < 8
    finally:
        for sock in held:
            sock.close()
    head = httpx.head(f"{guarded.metrics}/metrics", timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert httpx.get(f"{guarded.metrics}/nope", timeout=5).status_code == 404
    assert httpx.post(f"{guarded.metrics}/metrics", timeout=5).status_code == 405


def test_an_error_leaves_a_clean_connection(guarded: Guarded) -> None:
    """After a 400 the connection is still usable (keep-alive) or closed with a FIN."""
    with httpx.Client(base_url=guarded.base, timeout=10) as client:
        for _ in range(3):
            openai_error(client.post("/v1/chat/completions", content=b"{nope"), 400)
            assert client.get("/health").status_code == 200
