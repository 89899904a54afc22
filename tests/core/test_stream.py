"""The stream vocabulary: OpenAI chunks decoded into events and events encoded back."""

from __future__ import annotations

from typing import Any

import pytest

from helexa.core.stream import (
    Finish,
    Output,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
    chunk_events,
    openai_delta,
    openai_message,
    openai_usage,
    read_usage,
)


def chunk(delta: Any, **choice: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, **choice}]}


def test_a_chunk_decodes_in_order_reasoning_text_calls_finish_usage() -> None:
    events = chunk_events(
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
                    "finish_reason": "stop",
                    "stop_reason": "END",
                }
            ],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": 7,
                "total_tokens": 12,
                "prompt_tokens_details": {"cached_tokens": 3},
                "completion_tokens_details": {"reasoning_tokens": 2},
            },
        }
    )
    assert events == [
        ReasoningDelta("hm"),
        TextDelta("hi"),
        ToolCallDelta(0, "c1", "grep", "{"),
        Finish("stop", "END"),
        Usage(5, 7, cached_tokens=3, reasoning_tokens=2),
    ]


def test_reasoning_alias_and_a_whole_message() -> None:
    assert chunk_events(chunk({"reasoning": "r"})) == [ReasoningDelta("r")]
    # reasoning_content wins when a server sends both.
    assert chunk_events(chunk({"reasoning_content": "a", "reasoning": "b"})) == [
        ReasoningDelta("a")
    ]
    whole = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "done", "reasoning_content": "r"},
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    assert chunk_events(whole) == [
        ReasoningDelta("r"),
        TextDelta("done"),
        Finish("length"),
        Usage(1, 2),
    ]


def test_tool_call_pieces() -> None:
    events = chunk_events(
        chunk(
            {
                "tool_calls": [
                    {"index": 1, "id": "c", "type": "function", "function": {"name": "f"}},
                    {"index": 1, "function": {"arguments": '{"a"'}},
                    {"function": {"arguments": {"x": 1}}},  # no index; arguments as an object
                    {"index": "2", "id": 7, "function": "bad"},  # wrong types: read as absent
                    "not a call",
                ]
            }
        )
    )
    assert events == [
        ToolCallDelta(1, "c", "f", ""),
        ToolCallDelta(1, arguments='{"a"'),
        ToolCallDelta(None, arguments='{"x": 1}'),
        ToolCallDelta(None),
    ]


def test_finish_and_usage() -> None:
    assert chunk_events(chunk({}, finish_reason="tool_calls")) == [Finish("tool_calls")]
    # vLLM's stop_reason is the stop string, or a token id: only a string is a sequence.
    assert chunk_events(chunk({}, finish_reason="stop", stop_reason=128001)) == [Finish("stop")]
    assert chunk_events(chunk({}, finish_reason=None, stop_reason="x")) == []
    assert chunk_events({"choices": [], "usage": {"prompt_tokens": 9}}) == [Usage(9, 0)]
    assert chunk_events({"choices": [], "usage": None}) == []
    assert chunk_events({"choices": [], "usage": {}}) == []
    garbled = {"prompt_tokens": "x", "completion_tokens": "3", "prompt_tokens_details": 5}
    assert read_usage(garbled) == Usage(0, 3)


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "data",
        [],
        {},
        {"choices": None},
        {"choices": "abc"},
        {"choices": [None, 3, "x"]},
        {"choices": [{"delta": "text"}]},
        {"choices": [{"delta": {"content": 3, "reasoning_content": ["r"], "tool_calls": {}}}]},
        {"choices": [{"delta": {"content": ""}, "finish_reason": 1}]},
        {"usage": [1, 2]},
    ],
)
def test_garbage_is_skipped_never_raised_on(garbage: Any) -> None:
    assert chunk_events(garbage) == []


def test_role_chunk_has_no_output() -> None:
    role = chunk({"role": "assistant", "content": ""}, finish_reason=None)
    assert chunk_events({**role, "usage": {"prompt_tokens": 4, "completion_tokens": 0}}) == [
        Usage(4, 0)
    ]


@pytest.mark.parametrize(
    "event",
    [
        TextDelta("hi"),
        ReasoningDelta("think"),
        ToolCallDelta(0, "call_1", "grep", '{"p": 1}'),
        ToolCallDelta(2, arguments="more"),
        ToolCallDelta(None, "c", "f"),
    ],
)
def test_events_round_trip_through_openai_deltas(event: Output) -> None:
    assert chunk_events(chunk(openai_delta(event))) == [event]


def test_openai_delta_shapes() -> None:
    assert openai_delta(TextDelta("a")) == {"content": "a"}
    assert openai_delta(ReasoningDelta("b")) == {"reasoning_content": "b"}
    assert openai_delta(ToolCallDelta(0, "c", "f", "{}")) == {
        "tool_calls": [
            {
                "index": 0,
                "id": "c",
                "type": "function",
                "function": {"name": "f", "arguments": "{}"},
            }
        ]
    }
    assert openai_delta(ToolCallDelta(0, arguments="x")) == {
        "tool_calls": [{"index": 0, "function": {"arguments": "x"}}]
    }


def test_usage_round_trip() -> None:
    assert openai_usage(Usage(3, 4)) == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    detailed = Usage(3, 4, cached_tokens=2, reasoning_tokens=1)
    assert read_usage(openai_usage(detailed)) == detailed


def test_openai_message_folds_events() -> None:
    message = openai_message(
        [
            ReasoningDelta("a"),
            ReasoningDelta("b"),
            TextDelta("x"),
            ToolCallDelta(1, "c2", "g", "{}"),
            ToolCallDelta(0, "c1", "f", '{"a"'),
            ToolCallDelta(0, arguments=": 1}"),
            Finish("tool_calls"),
            Usage(1, 1),
        ]
    )
    assert message == {
        "role": "assistant",
        "content": "x",
        "reasoning_content": "ab",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ],
    }
    calls_only = openai_message([ToolCallDelta(0, "c", "f", "{}")])
    assert calls_only["content"] is None and "reasoning_content" not in calls_only
    assert openai_message([]) == {"role": "assistant", "content": ""}
    # A whole answer decodes back to the same events.
    whole = {"choices": [{"message": message, "finish_reason": "tool_calls"}]}
    assert [type(e) for e in chunk_events(whole)] == [
        ReasoningDelta,
        TextDelta,
        ToolCallDelta,
        ToolCallDelta,
        Finish,
    ]
