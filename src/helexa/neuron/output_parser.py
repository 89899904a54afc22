"""Generated text → OpenAI message deltas.

A parser sees text as it streams and returns delta fragments (``{"content": …}``,
``{"reasoning_content": …}``, ``{"tool_calls": […]}``). ``PlainText`` passes text through;
``TaggedOutput`` understands Qwen/Hermes-style ``<think>…</think>`` reasoning and
``<tool_call>{json}</tool_call>`` calls, whatever the token boundaries.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Protocol

log = logging.getLogger("helexa.neuron.output")

Delta = dict[str, Any]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


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


def _partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could begin one of ``tags``."""
    best = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:size]):
                best = size
                break
    return best


def parse_tool_call(raw: str) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) from a Hermes call body, or None if malformed."""
    try:
        call = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


class TaggedOutput:
    """A small state machine: text ⇄ reasoning, text ⇄ tool call."""

    def __init__(self, *, reasoning: bool, tools: bool, in_reasoning: bool = False) -> None:
        self._reasoning = reasoning
        self._tools = tools
        self._mode = "think" if in_reasoning else "text"
        self._held = ""
        self._call = ""
        self._calls = 0
        self._trim = in_reasoning  # drop whitespace right after a tag
        self.malformed_calls = 0

    @property
    def saw_tool_calls(self) -> bool:
        return self._calls > 0

    def _open_tags(self) -> tuple[str, ...]:
        tags = []
        if self._reasoning:
            tags.append(THINK_OPEN)
        if self._tools:
            tags.append(CALL_OPEN)
        return tuple(tags)

    def _emit(self, out: list[Delta], key: str, text: str) -> None:
        if self._trim:
            text = text.lstrip()
            if not text:
                return
            self._trim = False
        if out and key in out[-1] and len(out[-1]) == 1:
            out[-1][key] += text
        else:
            out.append({key: text})

    def _close_call(self, out: list[Delta]) -> None:
        parsed = parse_tool_call(self._call.strip())
        if parsed is None:
            self.malformed_calls += 1
            log.warning("malformed tool call reported as text", extra={"raw": self._call[:200]})
            self._emit(out, "content", CALL_OPEN + self._call + CALL_CLOSE)
        else:
            name, arguments = parsed
            out.append(
                {
                    "tool_calls": [
                        {
                            "index": self._calls,
                            "id": f"call_{uuid.uuid4().hex[:24]}",
                            "type": "function",
                            "function": {"name": name, "arguments": arguments},
                        }
                    ]
                }
            )
            self._calls += 1
        self._call = ""
        self._trim = True

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        buffer = self._held + text
        self._held = ""
        while buffer:
            if self._mode == "text":
                tags = self._open_tags()
                hits = [(buffer.find(t), t) for t in tags if t in buffer]
                if hits:
                    index, tag = min(hits)
                    if index:
                        self._emit(out, "content", buffer[:index])
                    buffer = buffer[index + len(tag) :]
                    self._mode = "think" if tag == THINK_OPEN else "call"
                    self._trim = self._mode == "think"
                    continue
                keep = _partial_tag_len(buffer, tags)
                if len(buffer) > keep:
                    self._emit(out, "content", buffer[: len(buffer) - keep])
                self._held = buffer[len(buffer) - keep :]
                break
            close = THINK_CLOSE if self._mode == "think" else CALL_CLOSE
            index = buffer.find(close)
            if index >= 0:
                if self._mode == "think":
                    if index:
                        self._emit(out, "reasoning_content", buffer[:index])
                    self._trim = True
                else:
                    self._call += buffer[:index]
                    self._close_call(out)
                buffer = buffer[index + len(close) :]
                self._mode = "text"
                continue
            keep = _partial_tag_len(buffer, (close,))
            body = buffer[: len(buffer) - keep]
            if self._mode == "think":
                if body:
                    self._emit(out, "reasoning_content", body)
            else:
                self._call += body
            self._held = buffer[len(buffer) - keep :]
            break
        return out

    def finish(self) -> list[Delta]:
        out: list[Delta] = []
        held, self._held = self._held, ""
        if self._mode == "call":  # cut off mid-call (length): report what there was
            self.malformed_calls += 1
            self._emit(out, "content", CALL_OPEN + self._call + held)
            self._call = ""
        elif held:
            self._emit(out, "reasoning_content" if self._mode == "think" else "content", held)
        return out


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
