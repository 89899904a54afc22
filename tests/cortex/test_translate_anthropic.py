"""Anthropic ⇄ OpenAI translation without I/O; streams are checked by the official SDK's
own stream helpers over an in-memory transport."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest

from helexa.core.errors import ApiError, anthropic_error_body
from helexa.core.stream import chunk_events
from helexa.cortex.translate import anthropic as tr
from tests.support.wire import call_delta

TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def request(**kwargs: Any) -> tr.MessagesRequest:
    base = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    return tr.MessagesRequest.model_validate({**base, **kwargs})


# --- requests ---------------------------------------------------------------------------------


def test_request_mapping_everything() -> None:
    req = request(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": " Really."}],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather? "},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "use tool", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "21C"}],
                    },
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
        stop_sequences=["END"],
        temperature=0.5,
        top_p=0.9,
        top_k=20,
        metadata={"user_id": "u-1"},
        thinking={"type": "enabled", "budget_tokens": 1024},
        stream=True,
    )
    body = tr.to_openai(req, "Qwen/Qwen3-8B")
    assert body["model"] == "Qwen/Qwen3-8B"
    messages = body["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief. Really."}
    assert messages[1]["content"][0] == {"type": "text", "text": "Weather? "}
    assert messages[1]["content"][1]["image_url"]["url"] == "data:image/png;base64,QUJD"
    assistant = messages[2]
    assert assistant["content"] == "Checking." and assistant["reasoning_content"] == "use tool"
    assert assistant["tool_calls"][0]["id"] == "toolu_1"
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "21C"}
    assert messages[4] == {"role": "user", "content": "Thanks"}
    assert body["tools"][0]["function"]["parameters"]["properties"]["city"]["type"] == "string"
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["stop"] == ["END"] and body["user"] == "u-1"
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.5, 0.9, 20)
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["stream"] and body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none")],
)
def test_tool_choice(choice: dict, expected: str) -> None:
    assert tr.to_openai(request(tools=TOOLS, tool_choice=choice), "m")["tool_choice"] == expected


def test_thinking_off_by_default_and_bad_blocks() -> None:
    assert tr.to_openai(request(), "m")["chat_template_kwargs"] == {"enable_thinking": False}
    with pytest.raises(ApiError) as info:
        tr.to_openai(request(messages=[{"role": "user", "content": [{"type": "video"}]}]), "m")
    assert info.value.status == 400 and info.value.param == "messages[0].content"
    for bad in (
        [{"type": "tool_result", "tool_use_id": "t", "content": ["plain"]}],
        [{"type": "image", "source": "http://x/y.png"}],
    ):
        with pytest.raises(ApiError) as nested:
            tr.to_openai(request(messages=[{"role": "user", "content": bad}]), "m")
        assert nested.value.status == 400
    assert anthropic_error_body(404, "x") == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "x"},
    }
    assert tr.error_from_openai(503, b'{"error": {"message": "busy"}}')["error"] == {
        "type": "overloaded_error",
        "message": "busy",
    }


# --- responses --------------------------------------------------------------------------------


def completion(message: dict, finish: str, stop: str | None = None) -> dict:
    return {
        "choices": [{"message": message, "finish_reason": finish, "stop_reason": stop}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7},
    }


def test_response_blocks_and_stop_reasons() -> None:
    out = tr.from_openai(
        completion(
            {
                "content": "Checking.",
                "reasoning_content": "think",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            "tool_calls",
        ),
        "claude-x",
    )
    assert out["model"] == "claude-x" and out["type"] == "message"
    assert [b["type"] for b in out["content"]] == ["thinking", "text", "tool_use"]
    assert out["content"][2]["input"] == {"city": "Paris"}
    assert out["stop_reason"] == "tool_use"
    assert out["usage"] == {"input_tokens": 11, "output_tokens": 7}
    assert (
        tr.from_openai(completion({"content": "a"}, "length"), "m")["stop_reason"] == "max_tokens"
    )
    stopped = tr.from_openai(completion({"content": "a"}, "stop", "END"), "m")
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "END")
    assert tr.from_openai(completion({"content": "a"}, "stop"), "m")["stop_reason"] == "end_turn"


# --- streams ----------------------------------------------------------------------------------


def chunks(*deltas: dict, finish: str = "stop", stop: str | None = None) -> list[dict]:
    out = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    out += [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    out.append(
        {"choices": [{"index": 0, "delta": {}, "finish_reason": finish, "stop_reason": stop}]}
    )
    out.append({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}})
    return out


def translate(stream: list[dict], model: str = "claude-x") -> bytes:
    translator = tr.StreamTranslator(model)
    events = translator.start()
    for chunk in stream:
        events += translator.feed(chunk_events(chunk))
    return tr.render(events + translator.finish())


def sdk_final(sse: bytes) -> tuple[anthropic.types.Message, list[str]]:
    """Run the bytes through the official SDK's messages.stream()."""
    transport = httpx2.MockTransport(
        lambda _req: httpx2.Response(
            200, content=sse, headers={"content-type": "text/event-stream"}
        )
    )
    client = anthropic.Anthropic(
        api_key="x", base_url="http://cortex", http_client=httpx2.Client(transport=transport)
    )
    with client.messages.stream(
        model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        texts = list(stream.text_stream)
        return stream.get_final_message(), texts


def test_tool_call_split_across_many_chunks() -> None:
    args = '{"city": "Paris", "unit": "celsius"}'
    deltas = [call_delta(0, "", "get_weather", "call_1")]
    deltas += [call_delta(0, args[i : i + 3]) for i in range(0, len(args), 3)]
    message, _ = sdk_final(translate(chunks(*deltas, finish="tool_calls")))
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use" and block.id == "call_1" and block.name == "get_weather"
    assert block.input == {"city": "Paris", "unit": "celsius"}
    assert message.usage.output_tokens == 5 and message.model == "claude-x"


def test_parallel_tool_calls() -> None:
    message, _ = sdk_final(
        translate(
            chunks(
                call_delta(0, '{"city": "Paris"}', "get_weather", "call_1"),
                call_delta(1, '{"tz":', "get_time", "call_2"),
                call_delta(1, ' "CET"}'),
                finish="tool_calls",
            )
        )
    )
    assert [(b.name, b.input) for b in message.content] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]


def test_reasoning_then_text_then_tool_call() -> None:
    sse = translate(
        chunks(
            {"reasoning_content": "I should "},
            {"reasoning_content": "look."},
            {"content": "Let me "},
            {"content": "check."},
            call_delta(0, '{"city": "Oslo"}', "get_weather", "call_9"),
            finish="tool_calls",
        )
    )
    message, texts = sdk_final(sse)
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "I should look."
    assert texts == ["Let me ", "check."]
    names = [line.split(b": ", 1)[1] for line in sse.split(b"\n") if line.startswith(b"event")]
    assert names[:2] == [b"message_start", b"ping"]
    assert names[-2:] == [b"message_delta", b"message_stop"]
    assert names.count(b"content_block_start") == names.count(b"content_block_stop") == 3


def test_length_stop_and_stop_sequence() -> None:
    message, texts = sdk_final(translate(chunks({"content": "partial"}, finish="length")))
    assert message.stop_reason == "max_tokens" and texts == ["partial"]
    message, _ = sdk_final(translate(chunks({"content": "x"}, stop="END")))
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")


def test_error_event_is_raised_by_the_sdk() -> None:
    translator = tr.StreamTranslator("claude-x")
    sse = tr.render(
        translator.start()
        + translator.feed(chunk_events(chunks({"content": "a"})[1]))
        + translator.error(502, "neuron died")
    )
    with pytest.raises(anthropic.APIStatusError, match="neuron died"):
        sdk_final(sse)


def test_claude_code_request_shapes() -> None:
    req = request(
        system=[
            {
                "type": "text",
                "text": "x-anthropic-billing-header: cc_version=2.1; cc_entrypoint=cli;",
            },
            {"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]},
            {"role": "system", "content": [{"type": "text", "text": "Agent types: none."}]},
        ],
        thinking={"type": "adaptive"},
        output_config={
            "effort": "high",
            "format": {"type": "json_schema", "schema": {"type": "object"}},
        },
        context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    )
    body = tr.to_openai(req, "m")
    assert body["messages"] == [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "Agent types: none."},
    ]
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": {"type": "object"}},
    }


@pytest.mark.parametrize(
    ("thinking", "on"),
    [
        (None, False),
        ({"type": "disabled"}, False),
        ({"type": "enabled", "budget_tokens": 9}, True),
        ({"type": "adaptive"}, True),
    ],
)
def test_thinking_modes(thinking: dict | None, on: bool) -> None:
    assert tr.to_openai(request(thinking=thinking), "m")["chat_template_kwargs"] == {
        "enable_thinking": on
    }


def test_nothing_is_silently_dropped() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QQ"}}
    body = tr.to_openai(
        request(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "text", "text": "see"}, image],
                        }
                    ],
                }
            ]
        ),
        "m",
    )
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"]
    for bad in (
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"thinking": {"type": "sometimes"}},
        {"output_config": {"format": {"type": "regex"}}},
        {"output_config": {"effort": "extreme"}},
    ):
        with pytest.raises(ApiError) as info:
            tr.to_openai(request(**bad), "m")
        assert info.value.status == 400


def test_context_overflow_is_worded_as_anthropic_does() -> None:
    raw = json.dumps(
        {
            "error": {
                "message": "too long",
                "code": "context_length_exceeded",
                "prompt_tokens": 9000,
                "context_length": 4096,
            }
        }
    ).encode()
    assert tr.error_from_openai(400, raw)["error"] == {
        "type": "invalid_request_error",
        "message": "prompt is too long: 9000 tokens > 4096 maximum",
    }


def test_server_tools_left_out_or_refused() -> None:
    tools = [
        {"name": "Read", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 8},
        {"type": "custom", "name": "Write", "input_schema": {"type": "object"}},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    ]
    kept = tr.tool_set(tools, "omit")
    assert [t["function"]["name"] for t in kept.tools] == ["Read", "Write"]
    assert kept.omitted == ("web_search_20250305", "text_editor_20250728")
    body = tr.to_openai(request(tools=tools), "m", kept)
    assert [t["function"]["name"] for t in body["tools"]] == ["Read", "Write"]
    with pytest.raises(ApiError) as info:
        tr.tool_set(tools, "reject")
    assert info.value.param == "tools[1].type" and "'web_search'" in info.value.message
    with pytest.raises(ApiError) as info:
        tr.tool_set([{"type": "web_search_20250305"}], "omit")  # a name, always
    assert info.value.param == "tools[0].name"


@pytest.mark.parametrize("name", [["x"], {"x": 1}, 5])
@pytest.mark.parametrize("deferred", [False, True])
def test_a_tool_name_that_is_not_a_string_is_a_400(name: Any, deferred: bool) -> None:
    """Not a 500 (a list cannot key the deferred tools), nor a name sent on to the model."""
    tool = {"name": name, "input_schema": {"type": "object"}, "defer_loading": deferred}
    with pytest.raises(ApiError) as info:
        tr.tool_set([tool], "omit")
    assert info.value.status == 400 and info.value.param == "tools[0].name"


def test_deferred_tools_expand_where_a_tool_reference_names_them() -> None:
    fetch = {"name": "WebFetch", "description": "Fetch.", "input_schema": {"type": "object"}}
    tools = [
        {"name": "ToolSearch", "input_schema": {"type": "object"}},
        {**fetch, "defer_loading": True},
        {"name": "DeferredToolPlaceholder", "input_schema": {}, "defer_loading": True},
    ]
    messages = [
        {"role": "user", "content": "fetch it"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t", "name": "ToolSearch", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t",
                    "content": [
                        {"type": "tool_reference", "tool_name": "WebFetch"},
                        {"type": "tool_reference", "tool_name": "Nope"},
                    ],
                }
            ],
        },
    ]
    kept = tr.tool_set(tools, "omit")
    assert [t["function"]["name"] for t in kept.tools] == ["ToolSearch"]
    assert kept.omitted == () and set(kept.deferred) == {"WebFetch", "DeferredToolPlaceholder"}
    body = tr.to_openai(request(tools=tools, messages=messages), "m", kept)
    assert [t["function"]["name"] for t in body["tools"]] == ["ToolSearch"]
    result = body["messages"][-1]
    assert result["role"] == "tool"
    expected = {"name": "WebFetch", "description": "Fetch.", "parameters": {"type": "object"}}
    assert result["content"].startswith(
        f"<functions>\n<function>{json.dumps(expected)}</function>\n</functions>"
    )
    assert "no deferred tool named 'Nope'" in result["content"]
    counted = tr.to_tokenize(
        tr.CountTokensRequest.model_validate({"model": "m", "tools": tools, "messages": messages}),
        "m",
        kept,
    )
    assert counted["messages"][-1] == result


def test_a_deferred_tool_is_written_once_however_often_it_is_referenced() -> None:
    """Thousands of references to one large definition stay the size of the request (each
    used to expand in full: a 240 kB request became 300 MB), in messages and count_tokens."""
    big = {"name": "Big", "description": "x" * 100_000, "input_schema": {"type": "object"}}
    tools = [{"name": "ToolSearch", "input_schema": {}}, {**big, "defer_loading": True}]
    result = {"type": "tool_reference", "tool_name": "Big"}
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    for turn in range(2):  # found again by a second search: already loaded
        use = {"type": "tool_use", "id": f"t{turn}", "name": "ToolSearch", "input": {}}
        messages.append({"role": "assistant", "content": [use]})
        answer = {"type": "tool_result", "tool_use_id": f"t{turn}", "content": [result] * 3000}
        messages.append({"role": "user", "content": [answer]})
    kept = tr.tool_set(tools, "omit")
    body = tr.to_openai(request(tools=tools, messages=messages), "m", kept)
    assert len(json.dumps(body)) < 2 * len(json.dumps(messages)) + 200_000
    first, second = body["messages"][2]["content"], body["messages"][4]["content"]
    assert first.count('"name": "Big"') == 1 and "x" * 100_000 in first
    assert "'Big' is loaded: its definition is above" in second and "x" * 1000 not in second
    counted = tr.to_tokenize(
        tr.CountTokensRequest.model_validate({"model": "m", "tools": tools, "messages": messages}),
        "m",
        kept,
    )
    assert counted["messages"] == body["messages"]


def test_tool_choice_of_a_left_out_or_deferred_tool() -> None:
    tools = [
        {"name": "Read", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "ws"},
        {"name": "WebFetch", "input_schema": {"type": "object"}, "defer_loading": True},
    ]
    kept = tr.tool_set(tools, "omit")
    with pytest.raises(ApiError) as info:
        tr.to_openai(request(tools=tools, tool_choice={"type": "tool", "name": "ws"}), "m", kept)
    assert info.value.param == "tool_choice" and "leaves out" in info.value.message
    body = tr.to_openai(
        request(tools=tools, tool_choice={"type": "tool", "name": "WebFetch"}), "m", kept
    )
    assert [t["function"]["name"] for t in body["tools"]] == ["Read", "WebFetch"]
    body = tr.to_openai(request(tools=tools, tool_choice={"type": "auto"}), "m", kept)
    assert [t["function"]["name"] for t in body["tools"]] == ["Read"]


@pytest.mark.parametrize("choice", [{"type": "tool", "name": ["x"]}, {"type": "auto", "name": {}}])
def test_tool_choice_with_an_odd_name_is_a_400_or_ignored(choice: dict[str, Any]) -> None:
    tools = [{"name": "x", "input_schema": {}, "defer_loading": True}]
    kept = tr.tool_set(tools, "omit")
    if choice["type"] == "tool":
        with pytest.raises(ApiError) as info:
            tr.to_openai(request(tools=tools, tool_choice=choice), "m", kept)
        assert info.value.param == "tool_choice"
    else:
        assert (
            tr.to_openai(request(tools=tools, tool_choice=choice), "m", kept)["tool_choice"]
            == "auto"
        )


def test_only_deferred_tools_are_sent_whole() -> None:
    """Tool search without any tool the model sees from the start cannot work: the deferred
    tools go in the tool list, so their calls are parsed."""
    tools = [{"name": "WebFetch", "input_schema": {"type": "object"}, "defer_loading": True}]
    body = tr.to_openai(request(tools=tools), "m", tr.tool_set(tools, "omit"))
    assert [t["function"]["name"] for t in body["tools"]] == ["WebFetch"]
