"""Anthropic Messages through a real cortex: the official anthropic SDK against real
neurons (tiny models) and, for tool calls, against a scripted neuron stand-in; the
openai SDK with tools on /v1/chat/completions through the same cortex."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests.cortex.conftest import Fleet

TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather for a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    }
]
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def sdk(fleet: Fleet) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fleet.base, api_key="unused", max_retries=0)


# --- real neurons -----------------------------------------------------------------------------


def test_messages_create_echoes_the_requested_model(fleet: Fleet) -> None:
    message = sdk(fleet).messages.create(
        model="helexa/fast", max_tokens=8, messages=ASK, system="Answer briefly."
    )
    assert message.model == "helexa/fast"
    assert message.role == "assistant" and message.type == "message"
    assert message.stop_reason in {"end_turn", "max_tokens"}
    assert message.usage.input_tokens > 5 and 1 <= message.usage.output_tokens <= 8
    assert all(block.type in {"text", "thinking"} for block in message.content)


def test_messages_stream_text_and_final_message(fleet: Fleet) -> None:
    with sdk(fleet).messages.stream(
        model="helexa/tiny-a", max_tokens=12, messages=ASK, extra_body={"temperature": 0.0}
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    text_blocks = [b.text for b in final.content if b.type == "text"]
    assert "".join(texts) == "".join(text_blocks)
    assert final.usage.output_tokens >= 1 and final.usage.input_tokens > 5
    assert final.stop_reason in {"end_turn", "max_tokens"}


def test_stop_sequences_report_which_one(fleet: Fleet) -> None:
    client = sdk(fleet)
    args = {
        "model": "helexa/tiny-a",
        "max_tokens": 60,
        "messages": ASK,
        "extra_body": {"temperature": 0.0},
    }
    full = "".join(b.text for b in client.messages.create(**args).content if b.type == "text")
    assert len(full) > 12, full
    stop = full[6:9]
    cut = client.messages.create(**args, stop_sequences=["\x00never", stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert "".join(b.text for b in cut.content if b.type == "text") == full[: full.index(stop)]


def test_count_tokens_comes_from_the_model_tokenizer(fleet: Fleet) -> None:
    counted = sdk(fleet).messages.count_tokens(
        model="helexa/tiny-a", messages=ASK, system="Answer briefly."
    )
    created = sdk(fleet).messages.create(
        model="helexa/tiny-a", max_tokens=1, messages=ASK, system="Answer briefly."
    )
    assert counted.input_tokens == created.usage.input_tokens


def test_errors_use_the_anthropic_envelope(fleet: Fleet) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk(fleet).messages.create(model="nobody/nothing", max_tokens=5, messages=ASK)
    assert missing.value.body["type"] == "error"
    assert missing.value.body["error"]["type"] == "not_found_error"
    url = f"{fleet.base}/v1/messages"
    for body in (
        b"{broken",
        json.dumps({"model": "helexa/tiny-a", "messages": ASK}).encode(),
        json.dumps(
            {
                "model": "helexa/tiny-a",
                "max_tokens": 5,
                "messages": [{"role": "robot", "content": "x"}],
            }
        ).encode(),
    ):
        response = httpx.post(url, content=body)
        assert response.status_code == 400, response.text
        payload = response.json()
        assert payload["type"] == "error"
        assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["message"]
    unservable = httpx.post(
        url, json={"model": "helexa/gpu-only", "max_tokens": 5, "messages": ASK}
    )
    assert unservable.status_code == 400 and "retry-after" not in unservable.headers
    assert unservable.json()["error"]["type"] == "invalid_request_error"


# --- tool use through the scripted neuron -----------------------------------------------------


def test_full_tool_use_turn(scripted: Fleet) -> None:
    client = sdk(scripted)
    first = client.messages.create(
        model="claude-test",
        max_tokens=200,
        messages=ASK,
        tools=TOOLS,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert first.model == "claude-test" and first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["thinking", "text", "tool_use"]
    call = first.content[2]
    assert call.name == "get_weather" and call.input == {"city": "Paris", "unit": "celsius"}
    answer = client.messages.create(
        model="claude-test",
        max_tokens=200,
        tools=TOOLS,
        messages=[
            *ASK,
            {
                "role": "assistant",
                "content": [b.model_dump(exclude_none=True) for b in first.content],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "21°C"}],
            },
        ],
    )
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].text == "It is 21°C in Paris."
    sent = httpx.get(f"{scripted.neurons['scripted'][1]}/_received").json()
    first_sent, second_sent = sent[-2], sent[-1]
    assert first_sent["model"] == "scripted/qwen"
    assert first_sent["tools"][0]["function"]["name"] == "get_weather"
    assert first_sent["chat_template_kwargs"] == {"enable_thinking": True}
    assistant = second_sent["messages"][1]
    assert assistant["tool_calls"][0]["id"] == call.id
    assert assistant["reasoning_content"].startswith("The user asks")
    assert second_sent["messages"][2] == {
        "role": "tool",
        "tool_call_id": call.id,
        "content": "21°C",
    }


def test_streamed_tool_use_with_sdk_helpers(scripted: Fleet) -> None:
    with sdk(scripted).messages.stream(
        model="claude-test",
        max_tokens=200,
        tools=TOOLS,
        messages=[{"role": "user", "content": "weather and time?"}],
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert "input_json" in events and "thinking" in events and "text" in events
    assert final.usage.input_tokens == 42


def test_openai_sdk_tools_through_cortex(scripted: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{scripted.base}/v1", api_key="x", max_retries=0)
    tools = [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["input_schema"],
            },
        }
        for t in TOOLS
    ]
    whole = client.chat.completions.create(model="claude-test", messages=ASK, tools=tools)
    assert whole.choices[0].finish_reason == "tool_calls"
    assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments) == {
        "city": "Paris",
        "unit": "celsius",
    }
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(
        model="claude-test", messages=ASK, tools=tools, stream=True
    ):
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            slot["name"] += delta.function.name or ""
            slot["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
