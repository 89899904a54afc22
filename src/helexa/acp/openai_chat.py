"""The ``openai-chat`` wire API: ``POST {base_url}/chat/completions`` with ``stream: true``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from helexa.acp.context import IS_ERROR
from helexa.acp.endpoint import EndpointError
from helexa.acp.http_endpoint import HttpEndpoint
from helexa.core.stream import Finish, StreamEvent, chunk_events

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
    """One ``chat.completion.chunk`` as events (pure), its finish reason normalised."""
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise EndpointError(f"the endpoint reported an error mid-stream: {message}")
    events = chunk_events(chunk)
    for i, event in enumerate(events):
        if isinstance(event, Finish):
            events[i] = Finish(_FINISH.get(event.reason, "stop"))
    return events


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
