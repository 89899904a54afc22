"""The ``anthropic-messages`` wire API: ``POST {base_url}/messages`` with ``stream: true``.

The conversation is kept in OpenAI form; ``to_anthropic`` translates it on the way out.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from helexa.acp.context import IS_ERROR
from helexa.acp.endpoint import EndpointError
from helexa.acp.http_endpoint import HttpEndpoint
from helexa.core.stream import (
    Finish,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    Usage,
)

ANTHROPIC_VERSION = "2023-06-01"
_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "refusal",
}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        return {"_unparsed_arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def to_anthropic(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """OpenAI chat messages as (system, Anthropic messages) (pure). Roles alternate, tool
    results ride in user turns, and the first turn is the user's, as the API requires."""
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for message in messages:
        role = message.get("role")
        if role == "system":
            system.append(_text_of(message.get("content")))
        elif role == "user":
            text = _text_of(message.get("content"))
            push("user", [{"type": "text", "text": text}] if text else [])
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            text = _text_of(message.get("content"))
            if text:
                blocks.append({"type": "text", "text": text})
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": function.get("name"),
                        "input": _tool_input(function.get("arguments") or ""),
                    }
                )
            push("assistant", blocks)
        elif role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id"),
                "content": _text_of(message.get("content")),
            }
            if message.get(IS_ERROR):
                block["is_error"] = True
            push("user", [block])
    if out and out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": [{"type": "text", "text": "(continued)"}]})
    return "\n\n".join(s for s in system if s), out


def to_anthropic_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "name": t["function"]["name"],
            "description": t["function"].get("description", ""),
            "input_schema": t["function"].get("parameters") or {"type": "object"},
        }
        for t in tools
        if t.get("type") == "function"
    ]


def request_body(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], model: str, max_tokens: int
) -> dict[str, Any]:
    system, converted = to_anthropic(messages)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": converted,
        "stream": True,
    }
    if system:
        body["system"] = system
    if tools:
        body["tools"] = to_anthropic_tools(tools)
    return body


@dataclass
class AnthropicStreamParser:
    """Messages SSE events as wire-neutral events; stateful for the usage counts."""

    input_tokens: int = 0

    def feed(self, name: str, data: dict[str, Any]) -> list[StreamEvent]:
        kind = data.get("type", name)
        if kind == "error":
            error = data.get("error") or {}
            raise EndpointError(f"the endpoint reported an error mid-stream: {error}")
        if kind == "message_start":
            usage = (data.get("message") or {}).get("usage") or {}
            self.input_tokens = int(usage.get("input_tokens") or 0) + int(
                usage.get("cache_read_input_tokens") or 0
            )
            return []
        if kind == "content_block_start":
            return self._block_start(int(data.get("index", 0)), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._block_delta(int(data.get("index", 0)), data.get("delta") or {})
        if kind == "message_delta":
            events: list[StreamEvent] = []
            usage = data.get("usage") or {}
            if usage:
                events.append(Usage(self.input_tokens, int(usage.get("output_tokens") or 0)))
            reason = (data.get("delta") or {}).get("stop_reason")
            if reason:
                events.append(Finish(_STOP.get(reason, "stop")))
            return events
        return []  # ping, content_block_stop, message_stop

    def _block_start(self, index: int, block: dict[str, Any]) -> list[StreamEvent]:
        kind = block.get("type")
        if kind == "tool_use":
            initial = block.get("input")
            arguments = json.dumps(initial) if initial else ""
            return [ToolCallDelta(index, block.get("id"), block.get("name"), arguments)]
        if kind == "text" and block.get("text"):
            return [TextDelta(block["text"])]
        if kind == "thinking" and block.get("thinking"):
            return [ReasoningDelta(block["thinking"])]
        return []

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[StreamEvent]:
        kind = delta.get("type")
        if kind == "text_delta":
            return [TextDelta(delta.get("text", ""))]
        if kind == "thinking_delta":
            return [ReasoningDelta(delta.get("thinking", ""))]
        if kind == "input_json_delta":
            return [ToolCallDelta(index, arguments=delta.get("partial_json", ""))]
        return []  # signature_delta and the like


class AnthropicMessagesEndpoint(HttpEndpoint):
    def headers(self) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        key = self.config.resolved_api_key()
        if key:
            headers["x-api-key"] = key
        return headers

    async def stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        model: str,
        max_tokens: int,
    ) -> AsyncIterator[StreamEvent]:
        body = request_body(messages, tools, model, max_tokens)
        parser = AnthropicStreamParser()
        async for name, data in self.post_events("/messages", body):
            if name is None:
                raise EndpointError("the endpoint answered JSON where an event stream was asked")
            for event in parser.feed(name, data):
                yield event
