"""What Claude Code, Codex-style clients and the SDKs send, through a real cortex: system
turns inside messages, adaptive thinking, fallbacks for names the client picks, Anthropic
wording for context overflow, nothing silently dropped, the Responses API, model lookups,
one access-log line and one error count per request."""

from __future__ import annotations

import json
import re

import anthropic
import httpx
import openai
import pytest

from tests.cortex.conftest import Fleet
from tests.support.fleet import start_cortex
from tests.support.procs import wait_for


def claude(fleet: Fleet) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fleet.base, api_key="any", max_retries=0)


def gpt(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.base}/v1", api_key="any", max_retries=0)


BILLING = "x-anthropic-billing-header: cc_version=2.1.197.{n}; cc_entrypoint=sdk-cli;"


# --- Claude Code's request shapes against real neurons ---------------------------------------


def test_system_turns_and_adaptive_thinking_as_claude_code_sends_them(fleet: Fleet) -> None:
    message = claude(fleet).messages.create(
        model="helexa/tiny-a",
        max_tokens=8,
        system=[
            {"type": "text", "text": BILLING.format(n=1)},
            {"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "system", "content": "Agent types: none."},  # type: ignore[list-item,typeddict-item]
        ],
        thinking={"type": "adaptive"},  # type: ignore[arg-type,typeddict-item]
        extra_body={
            "output_config": {"effort": "high"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
        },
    )
    assert message.stop_reason in {"end_turn", "max_tokens"}
    assert message.usage.input_tokens > 10


def test_billing_header_does_not_reach_the_prompt(fleet: Fleet) -> None:
    """Every session's prompt starts with the same bytes: the per-session header is gone."""

    def count(system: list[dict[str, str]]) -> int:
        return (
            claude(fleet)
            .messages.count_tokens(
                model="helexa/tiny-a",
                system=system,  # type: ignore[arg-type]
                messages=[{"role": "user", "content": "hi"}],
            )
            .input_tokens
        )

    plain = count([{"type": "text", "text": "Be brief."}])
    assert (
        count(
            [{"type": "text", "text": BILLING.format(n=7)}, {"type": "text", "text": "Be brief."}]
        )
        == plain
    )
    assert (
        count(
            [
                {"type": "text", "text": BILLING.format(n=12345)},
                {"type": "text", "text": "Be brief."},
            ]
        )
        == plain
    )


def test_message_start_carries_the_real_prompt_count(fleet: Fleet) -> None:
    with claude(fleet).messages.stream(
        model="helexa/tiny-a", max_tokens=4, messages=[{"role": "user", "content": "hello there"}]
    ) as stream:
        first = next(iter(stream))
        assert first.type == "message_start"
        opening = first.message.usage.input_tokens
        final = stream.get_final_message()
    assert opening > 5 and opening == final.usage.input_tokens


def test_prompt_too_long_is_worded_as_anthropic_does(fleet: Fleet) -> None:
    long = "The quick brown fox jumps over the lazy dog. " * 400  # > 2048 tokens here
    with pytest.raises(anthropic.BadRequestError) as info:
        claude(fleet).messages.create(
            model="helexa/tiny-a", max_tokens=4, messages=[{"role": "user", "content": long}]
        )
    body = info.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert re.fullmatch(r"prompt is too long: \d+ tokens > 2048 maximum", body["error"]["message"])


def test_image_in_a_tool_result_is_refused_by_name_not_dropped(fleet: Fleet) -> None:
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"},
    }
    with pytest.raises(anthropic.BadRequestError, match="image_url"):
        claude(fleet).messages.create(
            model="helexa/tiny-a",
            max_tokens=4,
            messages=[
                {"role": "user", "content": "look"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}],
                },
            ],
            tools=[{"name": "shot", "input_schema": {"type": "object"}}],
        )


def test_server_tools_are_left_out_and_named(fleet: Fleet) -> None:
    """Claude Code's WebSearch sends Anthropic's server tool: no model here can run it, so
    the model answers without it and the client hears what was left out."""
    raw = claude(fleet).messages.with_raw_response.create(
        model="helexa/tiny-a",
        max_tokens=4,
        messages=[{"role": "user", "content": "search"}],
        tools=[
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 8},  # type: ignore[list-item]
            {"type": "bash_20250124", "name": "bash"},  # type: ignore[list-item]
        ],
    )
    assert raw.headers["x-helexa-omitted-tools"] == "web_search_20250305, bash_20250124"
    assert raw.parse().stop_reason in {"end_turn", "max_tokens"}
    counted = claude(fleet).messages.with_raw_response.count_tokens(
        model="helexa/tiny-a",
        messages=[{"role": "user", "content": "search"}],
        tools=[{"type": "web_search_20250305", "name": "web_search"}],  # type: ignore[list-item]
    )
    assert counted.headers["x-helexa-omitted-tools"] == "web_search_20250305"
    lines = [line for line in fleet.cortex.log().splitlines() if "path=/v1/messages " in line]
    assert "omitted_tools=web_search_20250305,bash_20250124" in lines[-1]


# --- names: fallbacks, 404 first, model lookups ----------------------------------------------


def test_fallback_serves_claude_names_and_is_listed(scripted: Fleet) -> None:
    message = claude(scripted).messages.create(
        model="claude-haiku-4-5-20251001",
        max_tokens=8,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert message.model == "claude-haiku-4-5-20251001"  # echoed as asked
    listing = httpx.get(f"{scripted.base}/v1/models").json()["data"]
    [pattern] = [m for m in listing if m["id"] == "claude-*"]
    assert pattern["fallback_for"] == "scripted/qwen"
    one = httpx.get(f"{scripted.base}/v1/models/claude-opus-4-8").json()
    assert (one["id"], one["alias_of"]) == ("claude-opus-4-8", "scripted/qwen")


def test_unknown_names_get_404_before_body_validation(fleet: Fleet) -> None:
    """No fallback in this catalogue: the name decides, whatever else is wrong."""
    response = httpx.post(
        f"{fleet.base}/v1/messages", json={"model": "claude-opus-4-8", "max_tokens": "lots"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    openai_404 = httpx.post(f"{fleet.base}/v1/responses", json={"model": "nope", "input": 5})
    assert openai_404.status_code == 404 and openai_404.json()["error"]["code"] == "model_not_found"


def test_model_lookup_in_both_shapes(fleet: Fleet) -> None:
    assert gpt(fleet).models.retrieve("helexa/fast").id == "helexa/fast"
    with pytest.raises(openai.NotFoundError):
        gpt(fleet).models.retrieve("no/such-model")
    listed = claude(fleet).models.list()
    ids = [m.id for m in listed.data]
    assert "helexa/tiny-a" in ids and all(m.type == "model" for m in listed.data)
    assert claude(fleet).models.retrieve("helexa/tiny-a").display_name == "helexa/tiny-a"
    with pytest.raises(anthropic.NotFoundError):
        claude(fleet).models.retrieve("no/such-model")


# --- the Responses API -----------------------------------------------------------------------


def test_responses_create_against_a_real_neuron(fleet: Fleet) -> None:
    response = gpt(fleet).responses.create(
        model="helexa/tiny-a",
        input="Say something.",
        instructions="Be brief.",
        max_output_tokens=6,
        temperature=0,
    )
    assert response.model == "helexa/tiny-a" and response.status in {"completed", "incomplete"}
    assert response.usage is not None and response.usage.input_tokens > 5
    assert response.output_text


def test_responses_stream_with_a_function_tool(scripted: Fleet) -> None:
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    client = gpt(scripted)
    with client.responses.stream(
        model="helexa/default",
        input="Weather in Paris?",
        tools=[tool],  # type: ignore[list-item]
        reasoning={"effort": "medium"},
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]
    # The result goes back as a function_call_output; the answer follows.
    answer = client.responses.create(
        model="helexa/default",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21C"},
        ],
        tools=[tool],  # type: ignore[list-item]
    )
    assert answer.output_text == "It is 21C in Paris."


def test_responses_refuses_what_it_cannot_do(scripted: Fleet) -> None:
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        gpt(scripted).responses.create(
            model="helexa/default", input="hi", previous_response_id="resp_123"
        )


def test_responses_hosted_tools_left_out_and_namespaces_flattened(scripted: Fleet) -> None:
    """Codex's shape: a namespace group of function tools and a hosted web_search. The
    model sees function tools; its call comes back with the namespace the client gave."""
    weather = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    tools = [
        {"type": "namespace", "name": "meteo", "description": "Weather.", "tools": [weather]},
        {"type": "web_search", "external_web_access": False},
        {"type": "code_interpreter", "container": {"type": "auto"}},
    ]
    raw = gpt(scripted).responses.with_raw_response.create(
        model="helexa/default",
        input="Weather in Paris?",
        tools=tools,  # type: ignore[arg-type]
    )
    assert raw.headers["x-helexa-omitted-tools"] == "web_search, code_interpreter"
    [call] = [item for item in raw.parse().output if item.type == "function_call"]
    assert call.name == "get_weather" and call.namespace == "meteo"
    sent = httpx.get(f"{scripted.neurons['scripted'][1]}/_received", timeout=5).json()[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    # Streamed, the same; and the call replayed with its namespace reaches the model.
    with gpt(scripted).responses.stream(
        model="helexa/default",
        input="Weather in Paris?",
        tools=tools,  # type: ignore[arg-type]
    ) as stream:
        final = stream.get_final_response()
    [call] = [item for item in final.output if item.type == "function_call"]
    assert call.namespace == "meteo"
    answer = gpt(scripted).responses.create(
        model="helexa/default",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": "get_weather",
                "namespace": "meteo",
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "21C"},
        ],
        tools=tools,  # type: ignore[arg-type]
    )
    assert answer.output_text == "It is 21C in Paris."


def test_hosted_tools_reject_restores_the_400(
    scripted: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``[compat] hosted_tools = "reject"``: a request naming a hosted tool is a 400 that
    names it, on both protocols."""
    url = scripted.neurons["scripted"][1]
    models = '[[models]]\nid = "scripted/qwen"\nvram_mb = 1\nmin_devices = 0\n'
    cortex, base, _metrics = start_cortex(
        tmp_path_factory.mktemp("reject"),
        {"scripted": url},
        models,
        extra='[compat]\nhosted_tools = "reject"\n',
    )
    try:
        strict = Fleet(cortex, base, "", scripted.neurons)
        with pytest.raises(openai.BadRequestError, match="web_search") as info:
            gpt(strict).responses.create(
                model="scripted/qwen",
                input="hi",
                tools=[{"type": "web_search"}],  # type: ignore[list-item]
            )
        assert info.value.body["param"] == "tools[0].type"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError, match="web_search_20250305"):
            claude(strict).messages.create(
                model="scripted/qwen",
                max_tokens=4,
                messages=[{"role": "user", "content": "search"}],
                tools=[{"type": "web_search_20250305", "name": "web_search"}],  # type: ignore[list-item]
            )
        # Namespaces of function tools are not hosted tools: still served.
        answer = gpt(strict).responses.create(
            model="scripted/qwen",
            input="hi",
            tools=[{"type": "namespace", "name": "n", "description": "", "tools": []}],  # type: ignore[list-item]
        )
        assert answer.output_text == "No tools, plain answer."
    finally:
        cortex.stop()


# --- operability -----------------------------------------------------------------------------


def test_access_log_line_and_error_count_per_request(fleet: Fleet) -> None:
    gpt(fleet).chat.completions.create(
        model="helexa/tiny-a", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    httpx.post(f"{fleet.base}/v1/chat/completions", json={"model": "ghost/model", "messages": []})
    # The line is written once the answer has gone out: wait for it, never race it.
    wait_for("the 404's access line", lambda: "model=ghost/model status=404" in fleet.cortex.log())
    log = fleet.cortex.log()
    ok = [
        line
        for line in log.splitlines()
        if "msg=request" in line and "path=/v1/chat/completions" in line and "status=200" in line
    ]
    assert ok and re.search(r"model=helexa/tiny-a .*node=n\d .*completion_tokens=\d", ok[-1])
    assert "model=ghost/model status=404" in log
    metrics = httpx.get(f"{fleet.metrics}/metrics").text
    assert re.search(
        r'cortex_request_errors_total\{model="unknown",node="",reason="model_not_found"\} [1-9]',
        metrics,
    )


# --- structured output, through every protocol -----------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "mood": {"enum": ["calm", "busy"]},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["ok", "mood", "note"],
    "additionalProperties": False,
}


def valid(text: str) -> dict:
    import jsonschema

    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value


def test_structured_output_openai_anthropic_and_responses(fleet: Fleet) -> None:
    ask = [{"role": "user", "content": "Report status as JSON."}]
    chat = gpt(fleet).chat.completions.create(
        model="helexa/tiny-a",
        messages=ask,  # type: ignore[arg-type]
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
        # Qwen3 templates think by default; the constraint applies after the reasoning,
        # which a random model may not close within max_tokens.
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    valid(chat.choices[0].message.content or "")
    with claude(fleet).messages.stream(
        model="helexa/tiny-a",
        max_tokens=60,
        messages=ask,  # type: ignore[arg-type]
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
    ) as stream:
        streamed = "".join(stream.text_stream)
    valid(streamed)
    response = gpt(fleet).responses.create(
        model="helexa/tiny-a",
        input="Report status as JSON.",
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "s", "schema": SCHEMA}},
    )
    valid(response.output_text)
