"""Responses ⇄ chat completions translation without I/O. Every streamed event is validated
against the openai SDK's own types and accumulated by the SDK's own stream state, and whole
streams run through ``client.responses.stream()`` over an in-memory transport."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from helexa.core.errors import ApiError
from helexa.core.stream import chunk_events
from helexa.cortex.translate import responses as tr
from helexa.cortex.translate.tool_set import header_value
from tests.support.wire import call_delta

STREAM_EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)

TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
    {"type": "function", "name": "get_time"},
]


def request(**kwargs: Any) -> tr.ResponsesRequest:
    return tr.ResponsesRequest.model_validate({"model": "m", "input": "hi", **kwargs})


def refused(param: str, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        tr.to_openai(request(**kwargs), "m-id")
    assert info.value.status == 400 and info.value.param == param, info.value
    return info.value


# --- requests ---------------------------------------------------------------------------------


def test_string_input_and_settings() -> None:
    body = tr.to_openai(
        request(
            instructions="Be brief.",
            max_output_tokens=64,
            temperature=0.3,
            top_p=0.9,
            parallel_tool_calls=False,
            user="u-1",
            prompt_cache_key="k",
            metadata={"a": "b"},
            store=True,
            include=["reasoning.encrypted_content"],
            truncation="auto",
            stream=True,
        ),
        "m-id",
    )
    assert body == {
        "model": "m-id",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ],
        "chat_template_kwargs": {"enable_thinking": False},
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 64,
        "temperature": 0.3,
        "top_p": 0.9,
        "parallel_tool_calls": False,
        "user": "u-1",
    }


def test_item_list_replays_a_tool_conversation() -> None:
    body = tr.to_openai(
        request(
            input=[
                {"role": "developer", "content": "Use tools."},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Weather here? "},
                        {"type": "input_image", "image_url": "data:image/png;base64,QUJD"},
                        {"type": "input_image", "image_url": "http://x/y.png", "detail": "low"},
                    ],
                },
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [{"type": "summary_text", "text": "short"}],
                    "content": [{"type": "reasoning_text", "text": "Two tools."}],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
                },
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": '{"city": "Oslo"}',
                },
                {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": ""},
                {"type": "function_call_output", "call_id": "call_1", "output": "21C"},
                {
                    "type": "function_call_output",
                    "call_id": "call_2",
                    "output": [{"type": "input_text", "text": "12:00"}],
                },
                {"role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
            ]
        ),
        "m-id",
    )
    assert body["messages"] == [
        {"role": "developer", "content": "Use tools."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather here? "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                {"type": "image_url", "image_url": {"url": "http://x/y.png", "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Two tools.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "user", "content": "Thanks"},
    ]


def test_assistant_turn_boundaries() -> None:
    body = tr.to_openai(
        request(
            input=[
                {"role": "user", "content": "a"},
                {"type": "reasoning", "summary": [], "content": []},  # says nothing: dropped
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "one"},
                {"role": "assistant", "content": "two"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": {"x": 1}},
                {"role": "system", "content": [{"type": "input_text", "text": "sys"}]},
            ]
        ),
        "m-id",
    )
    assert body["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "one"},
        {
            "role": "assistant",
            "content": "two",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "system", "content": "sys"},
    ]


def test_tool_output_with_an_image_keeps_it() -> None:
    output = [
        {"type": "input_text", "text": "see"},
        {"type": "input_image", "image_url": "http://x/p.png"},
    ]
    body = tr.to_openai(
        request(input=[{"type": "function_call_output", "call_id": "c", "output": output}]),
        "m-id",
    )
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "see"},
        {"type": "image_url", "image_url": {"url": "http://x/p.png"}},
    ]


def test_tools_are_flat_function_tools() -> None:
    body = tr.to_openai(request(tools=TOOLS), "m-id")
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": TOOLS[0]["parameters"],
                "strict": True,
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "",
                "parameters": {"type": "object", "properties": {}},
            },
        },
    ]


CODEX_TOOLS = [
    {"type": "function", "name": "exec_command", "parameters": {"type": "object"}},
    {
        "type": "namespace",
        "name": "multi_agent_v1",
        "description": "Tools for spawning and managing sub-agents.",
        "tools": [
            {"type": "function", "name": "spawn_agent", "parameters": {"type": "object"}},
            {"type": "function", "name": "exec_command", "description": "clashes"},
            {"type": "custom", "name": "freeform"},
        ],
    },
    {"type": "web_search", "external_web_access": False},
    {"type": "image_generation"},
]


def test_namespace_tools_reach_the_model_as_functions() -> None:
    tools = tr.tool_set(CODEX_TOOLS, "omit")
    seen = [t["function"]["name"] for t in tools.tools]
    # A namespaced tool keeps its own name unless another tool has it already.
    assert seen == ["exec_command", "spawn_agent", "multi_agent_v1__exec_command"]
    assert all(t["type"] == "function" for t in tools.tools)
    assert tools.omitted == ("multi_agent_v1.freeform", "web_search", "image_generation")
    assert tools.call_fields("spawn_agent") == {
        "name": "spawn_agent",
        "namespace": "multi_agent_v1",
    }
    assert tools.call_fields("multi_agent_v1__exec_command") == {
        "name": "exec_command",
        "namespace": "multi_agent_v1",
    }
    assert tools.call_fields("exec_command") == {"name": "exec_command"}
    assert tools.call_fields("made_up") == {"name": "made_up"}
    assert tools.visible("exec_command", "multi_agent_v1") == "multi_agent_v1__exec_command"
    assert tools.visible("exec_command", None) == "exec_command"
    assert tools.visible("spawn_agent", "elsewhere") == "spawn_agent"
    body = tr.to_openai(
        request(
            tools=CODEX_TOOLS,
            tool_choice={"type": "function", "name": "exec_command", "namespace": "multi_agent_v1"},
            input=[
                {"role": "user", "content": "go"},
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "exec_command",
                    "namespace": "multi_agent_v1",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "c1", "output": "done"},
            ],
        ),
        "m",
        tools,
    )
    assert body["tools"] == tools.tools
    assert body["tool_choice"]["function"]["name"] == "multi_agent_v1__exec_command"
    [replayed] = body["messages"][1]["tool_calls"]
    assert replayed["function"]["name"] == "multi_agent_v1__exec_command"


def test_hosted_tools_refused_by_name_when_asked() -> None:
    with pytest.raises(ApiError) as info:
        tr.tool_set(CODEX_TOOLS, "reject")
    assert info.value.param == "tools[1].tools[2].type" and "'custom'" in info.value.message
    with pytest.raises(ApiError) as info:
        tr.tool_set([{"type": "web_search"}], "reject")
    assert info.value.param == "tools[0].type" and "'web_search'" in info.value.message


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([{"type": "namespace", "tools": []}], "tools[0].name"),
        ([{"type": "namespace", "name": "n", "tools": "x"}], "tools[0].tools"),
        (
            [{"type": "namespace", "name": "n", "tools": [{"type": "function"}]}],
            "tools[0].tools[0].name",
        ),
        (
            [{"type": "namespace", "name": f"n{i}", "tools": [TOOLS[0]] * 300} for i in range(2)],
            "tools",
        ),
    ],
)
def test_bad_namespaces(tools: list[dict[str, Any]], param: str) -> None:
    with pytest.raises(ApiError) as info:
        tr.tool_set(tools, "omit")
    assert info.value.status == 400 and info.value.param == param


def test_omitted_labels_are_safe_to_log_and_send() -> None:
    weird = [{"type": "x\r\nSet-Cookie: a=b"}, {"type": "é" * 100}, {"type": None}, {}]
    omitted = tr.tool_set(weird, "omit").omitted
    assert omitted[0] == "x??Set-Cookie:?a?b"  # no CR, LF, space or "=" gets through
    assert omitted[1] == "?" * 64 and omitted[2:] == ("unnamed", "unnamed")
    assert header_value(omitted).decode("ascii").count(",") == 2  # "unnamed" once


def test_namespaced_calls_come_back_with_their_namespace() -> None:
    tools = tr.tool_set(CODEX_TOOLS, "omit")
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "spawn_agent", "arguments": "{}"},
            },
            {
                "id": "c2",
                "type": "function",
                "function": {"name": "exec_command", "arguments": "{}"},
            },
        ],
    }
    resp = {"choices": [{"message": message, "finish_reason": "tool_calls"}], "usage": {}}
    out = tr.from_openai(resp, "m", request(tools=CODEX_TOOLS), tools)["output"]
    assert [(o["name"], o.get("namespace")) for o in out] == [
        ("spawn_agent", "multi_agent_v1"),
        ("exec_command", None),
    ]
    translator = tr.StreamTranslator("m", request(tools=CODEX_TOOLS, stream=True), tools)
    events: list[tr.Event] = []
    for chunk in chunks(call_delta(0, "{}", "multi_agent_v1__exec_command", "c3")):
        events += translator.feed(chunk_events(chunk))
    events += translator.finish()
    state, _ = accumulate(events)
    assert state._completed_response is not None
    [call] = state._completed_response.output
    assert call.type == "function_call"
    assert (call.name, call.namespace) == ("exec_command", "multi_agent_v1")


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        (
            {"type": "function", "name": "get_time"},
            {"type": "function", "function": {"name": "get_time"}},
        ),
    ],
)
def test_tool_choice(choice: Any, expected: Any) -> None:
    assert tr.to_openai(request(tools=TOOLS, tool_choice=choice), "m")["tool_choice"] == expected


@pytest.mark.parametrize(
    ("reasoning", "enabled"),
    [
        (None, False),
        ({"effort": "none"}, False),
        ({"effort": "minimal"}, False),
        ({"summary": "auto"}, False),
        ({"effort": "low"}, True),
        ({"effort": "high", "summary": "detailed"}, True),
    ],
)
def test_reasoning_switches_thinking(reasoning: dict | None, enabled: bool) -> None:
    body = tr.to_openai(request(reasoning=reasoning), "m")
    assert body["chat_template_kwargs"] == {"enable_thinking": enabled}


def test_text_format() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    fmt = {"type": "json_schema", "name": "num", "schema": schema, "strict": True}
    body = tr.to_openai(request(text={"format": fmt}), "m")
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "num", "schema": schema, "strict": True},
    }
    body = tr.to_openai(request(text={"format": {"type": "json_object"}}), "m")
    assert body["response_format"] == {"type": "json_object"}
    body = tr.to_openai(request(text={"format": {"type": "text"}, "verbosity": "low"}), "m")
    assert "response_format" not in body


def test_refusals() -> None:
    error = refused("previous_response_id", previous_response_id="resp_1")
    assert "no conversation state" in error.message and "input" in error.message
    assert error.openai_body()["error"]["param"] == "previous_response_id"
    refused("conversation", conversation="conv_1")
    refused("background", background=True)
    refused("prompt", prompt={"id": "pmpt_1"})
    error = refused("tools[1].type", tools=[TOOLS[0], {"type": "web_search"}])
    assert "'web_search'" in error.message
    refused("tools[0].type", tools=[{"type": "file_search", "vector_store_ids": ["v"]}])
    refused("tools[0].type", tools=[{"type": "computer_use_preview"}])
    error = refused("tools[0].name", tools=[{"type": "function", "function": {"name": "f"}}])
    assert "flat" in error.message
    refused("tool_choice", tool_choice={"type": "web_search_preview"})
    refused("tool_choice", tool_choice="sometimes")
    refused("reasoning.effort", reasoning={"effort": "extreme"})
    refused("text.format.type", text={"format": {"type": "xml"}})
    refused("text.format.schema", text={"format": {"type": "json_schema", "name": "x"}})
    refused("input", input=None)
    refused("input", input=[])
    refused("input[0]", input=[{"type": "item_reference", "id": "msg_1"}])
    refused("input[0]", input=[{"type": "computer_call_output", "call_id": "c"}])
    refused("input[0]", input=[{"type": "function_call", "name": "f", "arguments": "{}"}])
    refused("input[0]", input=[{"type": "function_call_output", "output": "x"}])
    file_part = {"type": "input_file", "file_id": "file_1"}
    refused("input[0].content", input=[{"role": "user", "content": [file_part]}])
    image_by_id = {"type": "input_image", "file_id": "file_1", "detail": "auto"}
    refused("input[0].content[0]", input=[{"role": "user", "content": [image_by_id]}])
    image = {"type": "input_image", "image_url": "http://x/y.png"}
    refused("input[0].content", input=[{"role": "system", "content": [image]}])


# --- non-stream response ----------------------------------------------------------------------


def completion(message: dict, finish: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m-id",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


def chat_call(id_: str, name: str, arguments: str) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_response_items_and_usage() -> None:
    req = request(tools=TOOLS, tool_choice="required", temperature=0.2, instructions="Hi.")
    message = {
        "role": "assistant",
        "reasoning_content": "Think.",
        "content": "Checking.",
        "tool_calls": [
            chat_call("call_1", "get_weather", '{"city":"Oslo"}'),
            chat_call("call_2", "get_time", "{}"),
        ],
    }
    body = tr.from_openai(completion(message, "tool_calls"), "gpt-x", req)
    response = Response.model_validate(body)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == "gpt-x"
    assert response.created_at == 1700000000 and response.incomplete_details is None
    assert [item.type for item in response.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    reasoning, text, call_1, call_2 = response.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert reasoning.content is not None and reasoning.content[0].text == "Think."
    assert text.type == "message" and text.status == "completed"
    assert response.output_text == "Checking."
    assert call_1.type == "function_call" and call_1.id and call_1.id.startswith("fc_")
    assert (call_1.call_id, call_1.name, call_1.arguments) == (
        "call_1",
        "get_weather",
        '{"city":"Oslo"}',
    )
    assert call_2.type == "function_call" and call_2.call_id == "call_2"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (11, 7)
    assert response.usage.total_tokens == 18
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.tool_choice == "required" and response.temperature == 0.2
    assert [tool.name for tool in response.tools] == ["get_weather", "get_time"]
    assert response.instructions == "Hi." and response.parallel_tool_calls is True


def test_response_cut_by_length_is_incomplete() -> None:
    body = tr.from_openai(completion({"content": "partial"}, "length"), "gpt-x")
    response = Response.model_validate(body)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    assert response.output_text == "partial"


def test_response_without_a_request_has_defaults() -> None:
    response = Response.model_validate(tr.from_openai(completion({"content": "x"}, "stop"), "g"))
    assert response.tools == [] and response.tool_choice == "auto"
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "text"


# --- streams ----------------------------------------------------------------------------------


def chunks(*deltas: dict, finish: str = "stop") -> list[dict]:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    out = [{**role, "usage": {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}}]
    out += [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    out.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    out.append(
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}}
    )
    return out


def translate(stream: list[dict], req: tr.ResponsesRequest | None = None) -> list[tr.Event]:
    translator = tr.StreamTranslator("gpt-x", req or request(stream=True))
    events: list[tr.Event] = []
    for chunk in stream:
        events += translator.feed(chunk_events(chunk))
    return events + translator.finish()


def accumulate(events: list[tr.Event]) -> tuple[ResponseStreamState, list[Any]]:
    """Validate every event strictly and feed it to the SDK's ``responses.stream()`` state."""
    numbers = [data["sequence_number"] for _, data in events]
    assert numbers == list(range(len(events)))
    state: ResponseStreamState = ResponseStreamState(input_tools=omit, text_format=omit)
    fired: list[Any] = []
    for name, data in events:
        assert data["type"] == name
        event = STREAM_EVENT.validate_python(orjson.loads(orjson.dumps(data)))
        assert event.type == name
        fired += state.handle_event(event)
    return state, fired


def sdk_stream(events: list[tr.Event]) -> tuple[list[Any], Any]:
    """Rendered bytes through the official SDK's ``client.responses.stream()``."""
    sse = tr.render(events)
    transport = httpx2.MockTransport(
        lambda _req: httpx2.Response(
            200, content=sse, headers={"content-type": "text/event-stream"}
        )
    )
    client = openai.OpenAI(
        api_key="x", base_url="http://cortex/v1", http_client=httpx2.Client(transport=transport)
    )
    with client.responses.stream(model="gpt-x", input="hi") as stream:
        seen = list(stream)
        try:
            final: Any = stream.get_final_response()
        except RuntimeError as exc:
            final = exc
    return seen, final


def names(events: list[tr.Event]) -> list[str]:
    return [name for name, _ in events]


def test_text_stream() -> None:
    events = translate(chunks({"content": "Hello"}, {"content": " world"}))
    assert names(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    state, _ = accumulate(events)
    final = state._completed_response
    assert final is not None and final.output_text == "Hello world"
    assert final.status == "completed" and final.model == "gpt-x"
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 5)
    seen, final = sdk_stream(events)
    assert final.output_text == "Hello world" and final.id == events[0][1]["response"]["id"]
    deltas = [e.delta for e in seen if e.type == "response.output_text.delta"]
    assert deltas == ["Hello", " world"]
    assert [e.snapshot for e in seen if e.type == "response.output_text.delta"] == [
        "Hello",
        "Hello world",
    ]


def test_reasoning_then_text_then_parallel_tool_calls() -> None:
    args = '{"city": "Paris", "unit": "celsius"}'
    deltas = [
        {"reasoning_content": "I should "},
        {"reasoning_content": "look."},
        {"content": "Let me "},
        {"content": "check."},
        call_delta(0, "", "get_weather", "call_1"),
    ]
    deltas += [call_delta(0, args[i : i + 5]) for i in range(0, len(args), 5)]
    deltas += [call_delta(1, '{"tz":', "get_time", "call_2"), call_delta(1, ' "CET"}')]
    events = translate(chunks(*deltas, finish="tool_calls"), request(tools=TOOLS, stream=True))
    kinds = names(events)
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done")
    assert kinds.count("response.output_item.added") == 4
    assert kinds[2:9] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    # Items close before the next opens, and every event names the item it belongs to.
    open_index = None
    for name, data in events:
        if name == "response.output_item.added":
            assert open_index is None
            open_index = data["output_index"]
        elif name == "response.output_item.done":
            assert data["output_index"] == open_index
            open_index = None
        elif "item_id" in data:
            assert data["output_index"] == open_index
    state, fired = accumulate(events)
    final = state._completed_response
    assert final is not None
    assert [item.type for item in final.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    reasoning = final.output[0]
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "I should look."
    assert final.output_text == "Let me check."
    calls = [(o.call_id, o.name, o.arguments) for o in final.output if o.type == "function_call"]
    assert calls == [("call_1", "get_weather", args), ("call_2", "get_time", '{"tz": "CET"}')]
    snapshots = [e.snapshot for e in fired if e.type == "response.function_call_arguments.delta"]
    assert snapshots[-1] == '{"tz": "CET"}' and args in snapshots
    done = [d for n, d in events if n == "response.function_call_arguments.done"]
    assert [d["arguments"] for d in done] == [args, '{"tz": "CET"}']
    _, final = sdk_stream(events)
    assert [o.type for o in final.output][-2:] == ["function_call", "function_call"]
    assert final.usage.total_tokens == 14


def test_length_stop_is_incomplete() -> None:
    events = translate(chunks({"content": "partial"}, finish="length"))
    assert names(events)[-2:] == ["response.output_item.done", "response.incomplete"]
    state, fired = accumulate(events)
    assert state._completed_response is None  # the SDK completes only on response.completed
    response = fired[-1].response
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.output_text == "partial"
    seen, final = sdk_stream(events)
    assert isinstance(final, RuntimeError) and seen[-1].type == "response.incomplete"


def test_error_mid_stream_fails_the_response() -> None:
    translator = tr.StreamTranslator("gpt-x", request(stream=True))
    stream = chunks({"content": "a"})
    events = translator.feed(chunk_events(stream[0])) + translator.feed(chunk_events(stream[1]))
    events += translator.error(502, "neuron died")
    assert names(events)[-1] == "response.failed"
    _, fired = accumulate(events)
    failed = fired[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.error.message == "neuron died"
    assert failed.output[0].status == "incomplete" and failed.output_text == "a"
    seen, final = sdk_stream(events)
    assert isinstance(final, RuntimeError) and seen[-1].type == "response.failed"


def test_error_before_anything_still_opens_the_stream() -> None:
    events = tr.StreamTranslator("gpt-x").error(429, "busy")
    assert names(events) == ["response.created", "response.in_progress", "response.failed"]
    _, fired = accumulate(events)
    assert fired[-1].response.error.code == "rate_limit_exceeded"


def test_empty_stream_completes_with_no_output() -> None:
    translator = tr.StreamTranslator("gpt-x")
    events = translator.finish()
    assert names(events) == ["response.created", "response.in_progress", "response.completed"]
    state, _ = accumulate(events)
    assert state._completed_response is not None and state._completed_response.output == []


def test_ping_opens_once_and_render_shape() -> None:
    translator = tr.StreamTranslator("gpt-x")
    opening = translator.ping()
    assert names(opening) == ["response.created", "response.in_progress"]
    assert translator.ping() == [] and translator.feed(chunk_events(chunks()[0])) == []
    assert translator.usage == {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
    raw = tr.render(opening[:1])
    head, data, tail = raw.split(b"\n", 2)
    assert head == b"event: response.created" and tail == b"\n"
    assert orjson.loads(data.removeprefix(b"data: "))["sequence_number"] == 0
    assert tr.KEEPALIVE.startswith(b":")


def test_stream_echoes_the_request() -> None:
    req = request(
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_time"},
        reasoning={"effort": "high", "summary": "auto"},
        max_output_tokens=99,
        metadata={"k": 1},
        text={"format": {"type": "json_schema", "schema": {"type": "object"}}},
        stream=True,
    )
    events = translate(chunks({"content": "{}"}), req)
    state, _ = accumulate(events)
    final = state._completed_response
    assert final is not None and final.max_output_tokens == 99
    assert final.reasoning is not None and final.reasoning.effort == "high"
    assert final.metadata == {"k": "1"}
    assert final.text is not None and final.text.format is not None
    assert final.text.format.type == "json_schema" and final.text.format.name == "response"
    assert final.tool_choice.type == "function"


def test_visible_names_never_collide() -> None:
    tools = [
        {"type": "function", "name": "run"},
        {"type": "function", "name": "a__run"},
        {"type": "namespace", "name": "a", "tools": [{"type": "function", "name": "run"}]},
        {"type": "namespace", "name": "b", "tools": [{"type": "function", "name": "run"}]},
    ]
    kept = tr.tool_set(tools)
    seen = [t["function"]["name"] for t in kept.tools]
    assert seen == ["run", "a__run", "a__run_2", "b__run"]
    assert kept.call_fields("a__run") == {"name": "a__run"}  # the top-level one
    assert kept.call_fields("a__run_2") == {"name": "run", "namespace": "a"}


def test_many_omitted_tools_are_counted_past_a_few() -> None:
    omitted = tr.tool_set([{"type": f"hosted_{i}"} for i in range(40)], "omit").omitted
    assert len(omitted) == 40
    value = header_value(omitted).decode()
    assert value.startswith("hosted_0, hosted_1") and value.endswith(", +24 more")
