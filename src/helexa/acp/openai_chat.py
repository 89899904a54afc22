"""The ``openai-chat`` wire API: ``POST {base_url}/chat/completions`` with ``stream: true``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from helexa.acp.context import IS_ERROR
from helexa.acp.endpoint import (
    EndpointError,
    Finish,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    UsageInfo,
)
from helexa.acp.http_endpoint import HttpEndpoint

_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "refusal",
}


def request_body(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], model: str, max_tokens: int
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [_openai_message(m) for m in messages],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        body["tools"] = tools
        body["tool_choice"] = "auto"
    return body


def _openai_message(message: dict[str, Any]) -> dict[str, Any]:
    """A wire message without ``is_error``: the Chat Completions API has no such field."""
    if IS_ERROR not in message:
        return message
    return {k: v for k, v in message.items() if k != IS_ERROR}


def parse_chunk(chunk: dict[str, Any]) -> list[StreamEvent]:
    """One ``chat.completion.chunk`` as events (pure)."""
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise EndpointError(f"the endpoint reported an error mid-stream: {message}")
    events: list[StreamEvent] = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or choice.get("message") or {}
        # reasoning_content: cortex, vLLM, DeepSeek; reasoning: newer vLLM and OpenRouter.
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            events.append(ReasoningDelta(reasoning))
        content = delta.get("content")
        if isinstance(content, str) and content:
            events.append(TextDelta(content))
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            events.append(
                ToolCallDelta(
                    index=call.get("index"),
                    id=call.get("id"),
                    name=function.get("name"),
                    arguments=_arguments_text(function.get("arguments")),
                )
            )
        if choice.get("finish_reason"):
            events.append(Finish(_FINISH.get(choice["finish_reason"], "stop")))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        events.append(
            UsageInfo(
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
            )
        )
    return events


def _arguments_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


class OpenAIChatEndpoint(HttpEndpoint):
    def headers(self) -> dict[str, str]:
        key = self.config.resolved_api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        model: str,
        max_tokens: int,
    ) -> AsyncIterator[StreamEvent]:
        body = request_body(messages, tools, model, max_tokens)
        async for _name, chunk in self.post_events("/chat/completions", body):
            for event in parse_chunk(chunk):  # a whole completion parses like a chunk
                yield event
