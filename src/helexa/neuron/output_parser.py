"""Generated text → stream events (``helexa.core.stream``).

A parser sees text as it streams and returns output events (``TextDelta``,
``ReasoningDelta``, ``ToolCallDelta``), which the neuron encodes as OpenAI chunks or one
message. ``PlainText`` passes text through; ``TaggedOutput`` understands Qwen/Hermes-style
``<think>…</think>`` reasoning and ``<tool_call>{json}</tool_call>`` calls, whatever the
token boundaries.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Protocol

from helexa.core.stream import Output, ReasoningDelta, TextDelta, ToolCallDelta

log = logging.getLogger("helexa.neuron.output")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


class OutputParser(Protocol):
    def feed(self, text: str) -> list[Output]: ...

    def finish(self) -> list[Output]: ...

    @property
    def saw_tool_calls(self) -> bool: ...


class PlainText:
    saw_tool_calls = False

    def feed(self, text: str) -> list[Output]:
        return [TextDelta(text)] if text else []

    def finish(self) -> list[Output]:
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
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None  # a call needs a name: without one it is text the model wrote
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

    def _emit(
        self, out: list[Output], kind: type[TextDelta] | type[ReasoningDelta], text: str
    ) -> None:
        if self._trim:
            text = text.lstrip()
            if not text:
                return
            self._trim = False
        last = out[-1] if out else None
        if isinstance(last, kind):  # text of one kind in a row is one event
            out[-1] = kind(last.text + text)
        else:
            out.append(kind(text))

    def _close_call(self, out: list[Output]) -> None:
        parsed = parse_tool_call(self._call.strip())
        if parsed is None:
            self.malformed_calls += 1
            log.warning("malformed tool call reported as text", extra={"raw": self._call[:200]})
            self._emit(out, TextDelta, CALL_OPEN + self._call + CALL_CLOSE)
        else:
            name, arguments = parsed
            out.append(ToolCallDelta(self._calls, f"call_{uuid.uuid4().hex[:24]}", name, arguments))
            self._calls += 1
        self._call = ""
        self._trim = True

    def feed(self, text: str) -> list[Output]:
        out: list[Output] = []
        buffer = self._held + text
        self._held = ""
        while buffer:
            if self._mode == "text":
                tags = self._open_tags()
                hits = [(buffer.find(t), t) for t in tags if t in buffer]
                if hits:
                    index, tag = min(hits)
                    if index:
                        self._emit(out, TextDelta, buffer[:index])
                    buffer = buffer[index + len(tag) :]
                    self._mode = "think" if tag == THINK_OPEN else "call"
                    self._trim = self._mode == "think"
                    continue
                keep = _partial_tag_len(buffer, tags)
                if len(buffer) > keep:
                    self._emit(out, TextDelta, buffer[: len(buffer) - keep])
                self._held = buffer[len(buffer) - keep :]
                break
            close = THINK_CLOSE if self._mode == "think" else CALL_CLOSE
            index = buffer.find(close)
            if index >= 0:
                if self._mode == "think":
                    if index:
                        self._emit(out, ReasoningDelta, buffer[:index])
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
                    self._emit(out, ReasoningDelta, body)
            else:
                self._call += body
            self._held = buffer[len(buffer) - keep :]
            break
        return out

    def finish(self) -> list[Output]:
        out: list[Output] = []
        held, self._held = self._held, ""
        if self._mode == "call":  # cut off mid-call (length): report what there was
            self.malformed_calls += 1
            self._emit(out, TextDelta, CALL_OPEN + self._call + held)
            self._call = ""
        elif held:
            self._emit(out, ReasoningDelta if self._mode == "think" else TextDelta, held)
        return out
