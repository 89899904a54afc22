"""The request-limit building blocks, without processes: name and quant rules, template
kwargs, counts, JSON depth, the one body reader, path scrubbing, error shapes, config."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from helexa.core.errors import ApiError, anthropic_body, scrub_paths
from helexa.core.http import (
    LIMITS_KEY,
    MAX_JSON_DEPTH,
    ClientGone,
    RequestLimits,
    error_body,
    parse_json,
    receive_body,
    validate,
)
from helexa.core.serving import GuardedProtocol, LimitsSettings, uvicorn_config
from helexa.core.wire import (
    ChatCompletionRequest,
    ModelSpec,
    TokenizeRequest,
    UnloadRequest,
    check_model_name,
    check_quant,
    check_template_kwargs,
)
from helexa.cortex.translate import anthropic, responses

USER = [{"role": "user", "content": "x"}]


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["Qwen/Qwen3-8B", "local-tiny", "/srv/models/x", "./x", "org/model.v2", "a" * 255, "x:q4"],
)
def test_good_model_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a" * 256, "at most 255"),
        ("a\x00b", "NUL"),
        ("a\tb", "U+0009"),
        ("a\x7fb", "U+007F"),
        ("claude-*", "glob"),
        ("a?b", "glob"),
        ("a[b]", "glob"),
        ("../etc", "'..'"),
        ("a/../../b", "'..'"),
        ("a\\..\\b", "'..'"),
    ],
)
def test_bad_model_names(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        check_model_name(name)


def test_a_spec_may_name_a_path_but_never_a_pattern() -> None:
    # ".." in a spec is left to model_dirs resolution, which answers 403 for an escape.
    assert validate(ModelSpec, {"model_id": "../x"}).model_id == "../x"
    for bad in ("a\x00", "a*", "x" * 300):
        for wire in (ModelSpec, UnloadRequest):
            with pytest.raises(ApiError) as info:
                validate(wire, {"model_id": bad})
            assert info.value.status == 400 and info.value.param == "model_id"


@pytest.mark.parametrize(
    "quant", ["Q4_K_M", "IQ2_XXS", "F16", "BF16", "UD-Q4_K_XL", "q8_0", "MXFP4"]
)
def test_good_quants(quant: str) -> None:
    assert check_quant(quant) == quant


@pytest.mark.parametrize("quant", ["*", "Q", "Q4*", "[Q]4", "../Q4", "Q4/x", "", "Q" * 70, ".4"])
def test_bad_quants(quant: str) -> None:
    with pytest.raises(ValueError):
        check_quant(quant)


# --- template kwargs and counts ----------------------------------------------------------------


def test_template_kwargs_allowlist() -> None:
    ok = {"enable_thinking": True, "reasoning_effort": "high", "thinking": None}
    assert check_template_kwargs(ok) == ok
    for bad, word in [
        ({"chat_template": "{{ x }}"}, "'chat_template'"),
        ({"tokenize": True}, "'tokenize'"),
        ({"enable_thinking": {"a": 1}}, "JSON scalar"),
        ({"enable_thinking": [1]}, "JSON scalar"),
    ]:
        with pytest.raises(ValueError, match=word):
            check_template_kwargs(bad)
    for wire in (ChatCompletionRequest, TokenizeRequest):
        with pytest.raises(ApiError) as info:
            validate(wire, {"model": "m", "messages": USER, "chat_template_kwargs": {"x": 1}})
        assert info.value.param == "chat_template_kwargs" and "'x'" in info.value.message


@pytest.mark.parametrize(
    ("wire", "body", "param"),
    [
        (ChatCompletionRequest, {"messages": USER * 10_001}, "messages"),
        (ChatCompletionRequest, {"messages": USER, "tools": [{}] * 513}, "tools"),
        (ChatCompletionRequest, {"messages": USER, "stop": ["s"] * 17}, "stop"),
        (TokenizeRequest, {"messages": USER * 10_001}, "messages"),
        (anthropic.MessagesRequest, {"max_tokens": 1, "messages": USER * 10_001}, "messages"),
        (
            anthropic.MessagesRequest,
            {"max_tokens": 1, "messages": USER, "tools": [{}] * 513},
            "tools",
        ),
        (
            anthropic.MessagesRequest,
            {"max_tokens": 1, "messages": USER, "stop_sequences": ["s"] * 17},
            "stop_sequences",
        ),
        (anthropic.CountTokensRequest, {"messages": USER * 10_001}, "messages"),
        (responses.ResponsesRequest, {"input": USER * 10_001}, "input"),
        (responses.ResponsesRequest, {"input": "x", "tools": [{}] * 513}, "tools"),
    ],
)
def test_counts_are_bounded(wire: Any, body: dict, param: str) -> None:
    with pytest.raises(ApiError) as info:
        validate(wire, {"model": "m", **body})
    assert info.value.status == 400 and info.value.param == param


def test_counts_at_the_bound_pass() -> None:
    validate(ChatCompletionRequest, {"model": "m", "messages": USER * 10_000, "stop": ["s"] * 16})


# --- JSON depth --------------------------------------------------------------------------------


def deep(levels: int) -> bytes:
    # {"x": [[...]]}: the object is one level, the lists the rest
    return b'{"x": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


def test_json_depth_bound() -> None:
    assert parse_json(deep(MAX_JSON_DEPTH)) == parse_json(deep(MAX_JSON_DEPTH))
    for levels in (MAX_JSON_DEPTH + 1, 255, 5000):
        with pytest.raises(ApiError) as info:
            parse_json(deep(levels))
        assert info.value.status == 400 and info.value.code == "invalid_json"


# --- the body reader ---------------------------------------------------------------------------


def scope(headers: dict[str, str] | None = None, **limits: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        LIMITS_KEY: RequestLimits(**limits),
    }


def receiver(*messages: dict[str, Any], stall: bool = False):  # type: ignore[no-untyped-def]
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if stall:
            await asyncio.sleep(3600)
        raise AssertionError("read past the end")

    return receive


def read(scope_: dict[str, Any], receive: Any) -> bytes:
    return asyncio.run(receive_body(scope_, receive))


def test_reads_a_body_in_pieces() -> None:
    receive = receiver(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    )
    assert read(scope(), receive) == b"abcd"


def test_a_declared_length_over_the_limit_reads_nothing() -> None:
    with pytest.raises(ApiError) as info:
        read(scope({"content-length": "11"}, max_body_bytes=10), receiver())
    assert info.value.status == 413 and info.value.headers == {"connection": "close"}


def test_an_undeclared_body_is_counted() -> None:
    receive = receiver(*[{"type": "http.request", "body": b"x" * 4, "more_body": True}] * 3)
    with pytest.raises(ApiError) as info:
        read(scope(max_body_bytes=10), receive)
    assert info.value.status == 413 and info.value.code == "request_too_large"


def test_a_stalled_body_is_408() -> None:
    receive = receiver({"type": "http.request", "body": b"{", "more_body": True}, stall=True)
    with pytest.raises(ApiError) as info:
        read(scope(body_timeout_s=0.05), receive)
    assert info.value.status == 408 and info.value.code == "request_timeout"


def test_a_client_that_leaves_is_client_gone() -> None:
    with pytest.raises(ClientGone):
        read(scope(), receiver({"type": "http.disconnect"}))


# --- error shapes and paths --------------------------------------------------------------------


def test_error_bodies_never_carry_server_paths() -> None:
    message = (
        "no config.json in /var/lib/neuron/.cache/huggingface/hub/models--a--b/snapshots/abc; "
        "see ~/.cache/huggingface/hub/x, use /v1/completions, http://beast:13131/v1/models"
    )
    scrubbed = scrub_paths(message)
    assert "/var/lib" not in scrubbed and ".cache" not in scrubbed
    assert "…/abc" in scrubbed and "/v1/completions" in scrubbed
    assert "http://beast:13131/v1/models" in scrubbed
    assert scrub_paths("model 'org/name' is not loaded") == "model 'org/name' is not loaded"
    error = ApiError(404, message)
    assert "/var/lib" not in error.openai_body()["error"]["message"]
    assert "/var/lib" not in anthropic_body(error)["error"]["message"]
    assert error.message == message  # logs keep the whole text


def test_a_model_folder_under_models_is_cut_and_api_routes_and_pointers_are_not() -> None:
    assert scrub_paths("no weights in /models/qwen/x") == "no weights in …/x"
    assert scrub_paths("POST /models/load failed") == "POST /models/load failed"
    assert scrub_paths("#/definitions/Address is invalid") == "#/definitions/Address is invalid"


def test_error_body_picks_the_envelope_by_route() -> None:
    error = ApiError(413, "too big", code="request_too_large")
    assert b'"type":"error"' in error_body("/v1/messages", error)
    assert b'"request_too_large"' in error_body("/v1/messages/count_tokens", error)
    assert b'"code":"request_too_large"' in error_body("/v1/chat/completions", error)


# --- config ------------------------------------------------------------------------------------


def test_limits_settings_become_the_servers() -> None:
    limits = LimitsSettings(max_body_mb=1, body_timeout_s=2, header_timeout_s=3, max_header_kb=4)
    config = uvicorn_config(object(), "127.0.0.1", 0, drain_timeout_s=1, limits=limits)
    assert config.http is GuardedProtocol
    server = config.helexa_limits  # type: ignore[attr-defined]
    assert server.request == RequestLimits(max_body_bytes=1024 * 1024, body_timeout_s=2)
    assert (server.header_timeout_s, server.max_header_bytes) == (3, 4096)
    assert server.max_connections <= 4096
    defaults = LimitsSettings()
    assert defaults.max_body_mb == 32 and defaults.header_timeout_s == 10


def test_both_daemons_read_a_limits_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from helexa.core.settings import load_settings
    from helexa.cortex.config import CortexSettings
    from helexa.neuron.config import NeuronSettings

    (tmp_path / "n.toml").write_text('host = "127.0.0.1"\n[limits]\nmax_body_mb = 2\n')
    assert load_settings(NeuronSettings, tmp_path / "n.toml").limits.max_body_mb == 2
    (tmp_path / "c.toml").write_text("[limits]\nbody_timeout_s = 5\nmax_connections = 100\n")
    cortex = load_settings(CortexSettings, tmp_path / "c.toml").limits
    assert (cortex.body_timeout_s, cortex.max_connections) == (5, 100)
