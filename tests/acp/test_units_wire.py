"""helexa-acp wire APIs: SSE framing, OpenAI chunks, Anthropic translation and events."""

from __future__ import annotations

import json

import pytest

from helexa.acp.anthropic_messages import AnthropicStreamParser, to_anthropic, to_anthropic_tools
from helexa.acp.config import EndpointConfig
from helexa.acp.endpoint import EndpointError, describe_http_error
from helexa.acp.openai_chat import parse_chunk, request_body
from helexa.acp.sse import parse_lines
from helexa.acp.tools import openai_tools
from helexa.core.stream import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCallAccumulator,
    ToolCallDelta,
    Usage,
)


def test_sse_framing() -> None:
    events = parse_lines(
        [": keep-alive", "event: a", "data: 1", "data: 2", "", "data: {}", "", "data: tail"]
    )
    assert [(e.event, e.data) for e in events] == [
        ("a", "1\n2"),
        ("message", "{}"),
        ("message", "tail"),
    ]


def test_openai_chunks_become_events() -> None:
    events = parse_chunk(
        {
            "choices": [
                {
                    "delta": {
                        "reasoning_content": "hm",
                        "content": "hi",
                        "tool_calls": [
                            {"index": 0, "id": "c1", "function": {"name": "grep", "arguments": "{"}}
                        ],
                    },
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7},
        }
    )
    assert events == [
        ReasoningDelta("hm"),
        TextDelta("hi"),
        ToolCallDelta(0, "c1", "grep", "{"),
        Finish("length"),
        Usage(5, 7),
    ]
    with pytest.raises(EndpointError, match="boom"):
        parse_chunk({"error": {"message": "boom"}})


def test_request_body_streams_with_usage_and_tools() -> None:
    body = request_body([{"role": "user", "content": "x"}], openai_tools(), "m", 100)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 100 and len(body["tools"]) == 6


def test_tool_call_pieces_accumulate() -> None:
    acc = ToolCallAccumulator()
    acc.add(ToolCallDelta(0, "a", "read_file", '{"pa'))
    acc.add(ToolCallDelta(0, None, "read_file", 'th": "x"}'))
    acc.add(ToolCallDelta(1, None, "bash", ""))
    calls = acc.calls()
    assert [(c.id, c.name, c.arguments) for c in calls[:1]] == [("a", "read_file", '{"path": "x"}')]
    assert calls[1].name == "bash" and calls[1].id.startswith("call_")
    unindexed = ToolCallAccumulator()
    unindexed.add(ToolCallDelta(None, "x", "grep", "{}"))
    unindexed.add(ToolCallDelta(None, "y", "bash", "{}"))
    assert [c.id for c in unindexed.calls()] == ["x", "y"]


def test_openai_history_translates_to_anthropic() -> None:
    system, messages = to_anthropic(
        [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "do it"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "function": {"name": "bash", "arguments": '{"command": "ls"}'}},
                    {"id": "c2", "function": {"name": "grep", "arguments": "not json"}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "out1"},
            {"role": "tool", "tool_call_id": "c2", "content": "out2"},
            {"role": "user", "content": "and then"},
        ]
    )
    assert system == "sys"
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"][0] == {
        "type": "tool_use",
        "id": "c1",
        "name": "bash",
        "input": {"command": "ls"},
    }
    assert messages[1]["content"][1]["input"] == {"_unparsed_arguments": "not json"}
    kinds = [b["type"] for b in messages[2]["content"]]
    assert kinds == ["tool_result", "tool_result", "text"]
    tools = to_anthropic_tools(openai_tools())
    assert {t["name"] for t in tools} >= {"read_file", "edit_file"}
    assert all("input_schema" in t for t in tools)


def test_anthropic_events_become_events() -> None:
    parser = AnthropicStreamParser()
    feed = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 11}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "t"},
        },
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "x"}},
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "tu", "name": "grep", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": '{"pattern"'},
        },
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 3},
        },
    ]
    events = [e for data in feed for e in parser.feed(data["type"], data)]
    assert events == [
        ReasoningDelta("t"),
        TextDelta("x"),
        ToolCallDelta(2, "tu", "grep", ""),
        ToolCallDelta(2, arguments='{"pattern"'),
        Usage(11, 3),
        Finish("tool_calls"),
    ]
    with pytest.raises(EndpointError):
        parser.feed("error", {"type": "error", "error": {"message": "overloaded"}})


def test_http_errors_say_what_to_do() -> None:
    config = EndpointConfig(name="c", api_key_env="MY_KEY")
    said = describe_http_error(config, 401, json.dumps({"error": {"message": "bad key"}}))
    assert "401" in said and "bad key" in said and "MY_KEY" in said
    assert "503" in describe_http_error(config, 503, "down")
