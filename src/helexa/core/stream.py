"""The vocabulary of a streamed chat answer: text, reasoning, tool-call pieces, usage, finish.

Defined once for everything that speaks it. The neuron's output parser emits these events
and encodes them as OpenAI chat chunks (``openai_delta``, ``openai_usage``) or a whole
message (``openai_message``); cortex's relay and translators and helexa-acp read chunks back
with ``chunk_events``, the one place a ``chat.completion.chunk`` is read. Frozen, slotted
dataclasses, no validation: one is made per token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call: ``index`` groups pieces (None: the server sent none); the
    first piece carries the id and the name, later ones more of the arguments."""

    index: int | None
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # of input_tokens, read from a prefix cache
    reasoning_tokens: int = 0  # of output_tokens


@dataclass(frozen=True, slots=True)
class Finish:
    # The OpenAI finish_reason as sent ("stop", "length", "tool_calls", …); ``stop_sequence``
    # is the stop string that matched (vLLM's ``stop_reason``), which Anthropic reports.
    reason: str
    stop_sequence: str | None = None


Output = TextDelta | ReasoningDelta | ToolCallDelta
StreamEvent = TextDelta | ReasoningDelta | ToolCallDelta | Usage | Finish


# --- decoding -----------------------------------------------------------------------------------


def chunk_events(chunk: Any) -> list[StreamEvent]:
    """One OpenAI ``chat.completion.chunk`` (or a whole ``chat.completion``: ``message`` in
    place of ``delta``) as events: per choice its reasoning, text, tool-call pieces and
    finish, then the usage. Tolerant of other servers (helexa-acp talks to vLLM, OpenRouter
    …): ``reasoning`` for ``reasoning_content``, arguments sent as an object, and whatever
    is not of the expected shape is skipped, never raised on. Events carry no choice index:
    every server here answers one choice (``n`` is at most 1)."""
    events: list[StreamEvent] = []
    if not isinstance(chunk, dict):
        return events
    choices = chunk.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                _choice_events(choice, events)
    usage = chunk.get("usage")
    if usage and isinstance(usage, dict):  # ``null`` on every chunk but the last, often
        events.append(read_usage(usage))
    return events


def _choice_events(choice: dict[str, Any], events: list[StreamEvent]) -> None:
    delta = choice.get("delta") or choice.get("message")
    if isinstance(delta, dict):
        # reasoning_content: helexa, vLLM, DeepSeek; reasoning: newer vLLM and OpenRouter.
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning and isinstance(reasoning, str):
            events.append(ReasoningDelta(reasoning))
        content = delta.get("content")
        if content and isinstance(content, str):
            events.append(TextDelta(content))
        calls = delta.get("tool_calls")
        if calls and isinstance(calls, list):
            events.extend(_tool_call(call) for call in calls if isinstance(call, dict))
    reason = choice.get("finish_reason")
    if reason and isinstance(reason, str):
        stop = choice.get("stop_reason")  # vLLM: the matched stop string, or a token id
        events.append(Finish(reason, stop if stop and isinstance(stop, str) else None))


def _tool_call(call: dict[str, Any]) -> ToolCallDelta:
    function = call.get("function")
    if not isinstance(function, dict):
        function = {}
    index, call_id, name = call.get("index"), call.get("id"), function.get("name")
    return ToolCallDelta(
        index if isinstance(index, int) else None,
        call_id if isinstance(call_id, str) else None,
        name if isinstance(name, str) else None,
        _arguments_text(function.get("arguments")),
    )


def _arguments_text(value: Any) -> str:
    """Arguments are a JSON string on the wire; some servers send the object itself."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _count(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def read_usage(usage: dict[str, Any]) -> Usage:
    """An OpenAI ``usage`` object as ``Usage``."""
    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    return Usage(
        _count(usage.get("prompt_tokens")),
        _count(usage.get("completion_tokens")),
        _count(prompt.get("cached_tokens")) if isinstance(prompt, dict) else 0,
        _count(completion.get("reasoning_tokens")) if isinstance(completion, dict) else 0,
    )


# --- assembling tool calls ----------------------------------------------------------------------


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class ToolCallAccumulator:
    """Tool-call pieces assembled into whole calls, in index order."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[int, ToolCall] = {}

    def add(self, delta: ToolCallDelta) -> None:
        index = delta.index if delta.index is not None else self._unindexed(delta.id)
        call = self._calls.get(index)
        if call is None:
            call = ToolCall(id="", name="", arguments="")
            self._calls[index] = call
        if delta.id:
            call.id = delta.id
        if delta.name and not call.name:  # some servers repeat the name in every piece
            call.name = delta.name
        call.arguments += delta.arguments

    def _unindexed(self, call_id: str | None) -> int:
        """Where a piece without an index goes: a new call when it brings a new id, else
        the latest call."""
        if not self._calls:
            return 0
        last = max(self._calls)
        if call_id and self._calls[last].id and self._calls[last].id != call_id:
            return last + 1
        return last

    def calls(self) -> list[ToolCall]:
        out = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if not call.name:
                continue
            # Some servers omit ids; the conversation needs one to pair results with calls.
            call.id = call.id or f"call_{uuid.uuid4().hex[:12]}"
            out.append(call)
        return out


# --- encoding -----------------------------------------------------------------------------------


def openai_delta(event: Output) -> dict[str, Any]:
    """An output event as the ``delta`` of an OpenAI chat chunk."""
    if isinstance(event, TextDelta):
        return {"content": event.text}
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    call: dict[str, Any] = {} if event.index is None else {"index": event.index}
    if event.id is not None:
        call["id"] = event.id
        call["type"] = "function"
    function: dict[str, Any] = {} if event.name is None else {"name": event.name}
    function["arguments"] = event.arguments
    call["function"] = function
    return {"tool_calls": [call]}


def openai_usage(usage: Usage) -> dict[str, Any]:
    """``Usage`` as an OpenAI ``usage`` object (the details only when there are any)."""
    out: dict[str, Any] = {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def openai_message(events: Iterable[StreamEvent]) -> dict[str, Any]:
    """A whole answer's output events folded into one OpenAI assistant message: content is
    None only when the answer is tool calls alone."""
    content: list[str] = []
    reasoning: list[str] = []
    calls = ToolCallAccumulator()
    for event in events:
        if isinstance(event, TextDelta):
            if event.text:
                content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            if event.text:
                reasoning.append(event.text)
        elif isinstance(event, ToolCallDelta):
            calls.add(event)
    tool_calls = calls.calls()
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(content) if content or not tool_calls else None,
    }
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if tool_calls:
        message["tool_calls"] = [call.to_openai() for call in tool_calls]
    return message
