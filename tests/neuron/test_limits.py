"""Request limits on a real neuron (§1.4, §1.5, §2.8.1): model ids and quant tags, counts,
``chat_template_kwargs``, ``max_tokens`` beyond the context, JSON depth, body and header
size; every error in the OpenAI envelope, never revealing a server path."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from helexa.up.tiny_model import TINY_REPO_ID

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def base(neuron):  # type: ignore[no-untyped-def]
    return neuron[1]


def error_of(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}
    if param is not None:
        assert error["param"] == param, error
    return error


def context_length(base: str) -> int:
    models = httpx.get(f"{base}/models").json()
    return next(m["context_length"] for m in models if m["id"] == TINY_REPO_ID)


# --- model ids and quant -----------------------------------------------------------------------

BAD_IDS = ["a\x00b", "x" * 256, "helexa/*", "helexa/tiny-qwen?", "org/[ab]", "a\nb", "a\x1bb"]


@pytest.mark.parametrize("model_id", BAD_IDS)
def test_bad_model_ids_are_400_on_every_route(base: str, model_id: str) -> None:
    for route in ("/models/load", "/models/size", "/models/unload"):
        response = httpx.post(f"{base}{route}", json={"model_id": model_id}, timeout=30)
        error_of(response, 400, "model_id")
    for route, body in [
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/completions", {"prompt": "hi"}),
        ("/tokenize", {"messages": USER}),
    ]:
        response = httpx.post(f"{base}{route}", json={"model": model_id, **body}, timeout=30)
        error_of(response, 400, "model")


def test_the_nul_is_not_echoed(base: str) -> None:
    response = httpx.post(f"{base}/models/load", json={"model_id": "evil\x00/x"}, timeout=30)
    error = error_of(response, 400, "model_id")
    assert "NUL" in error["message"] and "\x00" not in error["message"]


@pytest.mark.parametrize("quant", ["*", "Q*", "[Q]4", "Q", "Q4/../x", "a" * 80, "Q4\x00"])
def test_bad_quants_are_400(base: str, quant: str) -> None:
    for route in ("/models/load", "/models/size"):
        body = {"model_id": "helexa/tiny-qwen3-gguf", "quant": quant}
        error_of(httpx.post(f"{base}{route}", json=body, timeout=30), 400, "quant")


def test_error_bodies_reveal_no_server_path(base: str, hf_cache: Path, model_dir: Path) -> None:
    attempts = [
        {"model_id": "bogus-arch"},  # under model_dirs, an architecture nobody supports
        {"model_id": "helexa/not-cached"},  # not in the cache, hub offline
        {"model_id": "helexa/tiny-qwen3-gguf", "quant": "Q5_K_M"},  # no such file
        {"model_id": str(model_dir / "bogus-arch")},
    ]
    for body in attempts:
        for route in ("/models/load", "/models/size"):
            response = httpx.post(f"{base}{route}", json=body, timeout=60)
            if route == "/models/load":  # (/models/size can measure the bogus folder)
                assert 400 <= response.status_code < 500, response.text
            text = response.text
            for private in (str(hf_cache), str(hf_cache.parent), str(model_dir), str(Path.home())):
                assert private not in text, (route, body, text)


# --- counts, template kwargs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("messages", USER * 10_001),
        ("tools", [{"type": "function", "function": {"name": f"f{i}"}} for i in range(513)]),
        ("stop", ["s"] * 17),
    ],
)
def test_counts_are_bounded(base: str, field: str, value: list) -> None:
    body = {"model": TINY_REPO_ID, "messages": USER, "max_tokens": 2, field: value}
    error = error_of(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30), 400, field)
    assert field in error["message"]
    if field != "stop":
        tokenize = {"model": TINY_REPO_ID, "messages": USER, field: value}
        error_of(httpx.post(f"{base}/tokenize", json=tokenize, timeout=30), 400, field)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chat_template": "{{ raise_exception('x') }}"},
        {"tokenize": True},
        {"add_generation_prompt": False},
        {"tools": []},
        {"enable_thinking": {"nested": True}},
        {"enable_thinking": [True]},
        {"reasoning_effort": "x" * 1000},
    ],
)
def test_template_kwargs_outside_the_allowlist_are_400(base: str, kwargs: dict) -> None:
    body = {
        "model": TINY_REPO_ID,
        "messages": USER,
        "max_tokens": 2,
        "chat_template_kwargs": kwargs,
    }
    for route in ("/v1/chat/completions", "/tokenize"):
        error = error_of(httpx.post(f"{base}{route}", json=body, timeout=30), 400)
        assert error["param"] == "chat_template_kwargs"
        assert repr(next(iter(kwargs))) in error["message"]


def test_allowlisted_template_kwargs_work(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(
        model=TINY_REPO_ID,
        messages=USER,
        max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False, "reasoning_effort": "low"}},
    )
    assert answer.choices[0].finish_reason in ("stop", "length")


# --- max_tokens beyond the context -------------------------------------------------------------


def test_max_tokens_beyond_the_context_is_400(base: str) -> None:
    context = context_length(base)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY_REPO_ID, messages=USER, max_tokens=context + 1)
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "max_tokens"
    assert error["message"] == (
        f"max_tokens ({context + 1}) is greater than the model's context length ({context})"
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=TINY_REPO_ID, messages=USER, max_completion_tokens=context * 4
        )
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TINY_REPO_ID, prompt="hi", max_tokens=context + 1)


def test_fit_max_tokens_clamps_instead(base: str) -> None:
    """cortex's Anthropic translation sets it: Claude Code's 64k max_tokens must not fail
    on a model with a smaller context (the answer is cut at the context instead)."""
    body = {
        "model": TINY_REPO_ID,
        "messages": USER,
        "max_tokens": context_length(base) * 4,
        "fit_max_tokens": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert any(line.startswith("data: {") for line in response.iter_lines())


def test_max_tokens_within_the_context_is_still_clamped(base: str) -> None:
    """At the context (the prompt leaves less room), the answer is cut short: length."""
    body = {"model": TINY_REPO_ID, "messages": USER, "max_tokens": context_length(base)}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text


# --- JSON and HTTP -----------------------------------------------------------------------------


def test_deep_json_is_400(base: str) -> None:
    for depth in (65, 300, 2000):
        deep = "[" * depth + "]" * depth
        raw = f'{{"model": "{TINY_REPO_ID}", "messages": [], "x": {deep}}}'
        for route in ("/v1/chat/completions", "/models/load"):
            response = httpx.post(
                f"{base}{route}",
                content=raw,
                headers={"content-type": "application/json"},
                timeout=30,
            )
            assert error_of(response, 400)["code"] == "invalid_json"


def raw_exchange(base: str, request: bytes) -> tuple[int, dict]:
    parts = urlsplit(base)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_declared_body_over_32_mib_is_413(base: str) -> None:
    status, body = raw_exchange(
        base,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\n"
        b"content-length: 40000000\r\n\r\n",
    )
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "32 MiB" in body["error"]["message"]


def test_oversized_headers_are_431(base: str) -> None:
    status, body = raw_exchange(
        base,
        b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: " + b"p" * (70 * 1024) + b"\r\n\r\n",
    )
    assert status == 431 and body["error"]["code"] == "request_header_fields_too_large"


def test_a_bad_chunk_size_is_400(base: str) -> None:
    """A chunked body whose chunk size is not hex: an answer, not a closed connection."""
    status, body = raw_exchange(
        base,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        b'5\r\n{"a":\r\nzz\r\n1}\r\n0\r\n\r\n',
    )
    assert status == 400 and body["error"]["code"] == "invalid_http"
    assert httpx.get(f"{base}/health").status_code == 200


def test_malformed_http_is_an_envelope(base: str) -> None:
    status, body = raw_exchange(base, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400 and body["error"]["code"] == "invalid_http"
