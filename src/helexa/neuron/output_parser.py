"""Generated text → OpenAI message deltas.

The seam for reasoning (``<think>``) and native tool-call extraction: a parser sees
text as it streams and returns delta fragments (``{"content": …}``,
``{"reasoning_content": …}``, ``{"tool_calls": […]}``). ``PlainText`` passes text
through as content.
"""

from __future__ import annotations

from typing import Any, Protocol

Delta = dict[str, Any]


class OutputParser(Protocol):
    def feed(self, text: str) -> list[Delta]: ...

    def finish(self) -> list[Delta]: ...

    @property
    def saw_tool_calls(self) -> bool: ...


class PlainText:
    saw_tool_calls = False

    def feed(self, text: str) -> list[Delta]:
        return [{"content": text}] if text else []

    def finish(self) -> list[Delta]:
        return []


def merge_deltas(deltas: list[Delta]) -> dict[str, Any]:
    """Fold streamed deltas into one assistant message (non-streaming answers)."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        if delta.get("content"):
            content.append(delta["content"])
        if delta.get("reasoning_content"):
            reasoning.append(delta["reasoning_content"])
        for call in delta.get("tool_calls") or []:
            slot = calls.setdefault(
                call["index"],
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            slot["id"] = call.get("id") or slot["id"]
            function = call.get("function") or {}
            slot["function"]["name"] += function.get("name") or ""
            slot["function"]["arguments"] += function.get("arguments") or ""
    message["content"] = "".join(content) if content or not calls else None
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message
