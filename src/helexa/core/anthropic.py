"""Anthropic Messages ⇄ OpenAI chat completions (§2.8): pure functions and a streaming
state machine, no I/O."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

import orjson
from pydantic import Field

from helexa.core.errors import ApiError, bad_request
from helexa.core.wire import Wire

# --- wire types -------------------------------------------------------------------------------


class AnthropicMessage(Wire):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(Wire):
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class CountTokensRequest(Wire):
    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    thinking: dict[str, Any] | None = None


# --- errors -----------------------------------------------------------------------------------

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error")


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_from_openai(status: int, raw: bytes) -> dict[str, Any]:
    """An OpenAI error envelope (from a neuron) in Anthropic's shape."""
    try:
        message = orjson.loads(raw)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = raw.decode(errors="replace")[:500] or f"upstream answered {status}"
    return error_body(status, message)


def api_error_body(exc: ApiError) -> dict[str, Any]:
    return error_body(exc.status, exc.message)


# --- request ----------------------------------------------------------------------------------


def _text_of_blocks(blocks: list[dict[str, Any]], where: str) -> str:
    parts = []
    for block in blocks:
        if block.get("type") != "text":
            raise bad_request(
                f"{where}: only text blocks are allowed here, got {block.get('type')!r}",
                param=where,
            )
        parts.append(str(block.get("text", "")))
    return "".join(parts)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source") or {}
    if not isinstance(source, dict):
        raise bad_request(f"{where}: an image source must be an object", param=where)
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = source.get("url", "")
    else:
        raise bad_request(f"{where}: unsupported image source {source.get('type')!r}", param=where)
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result_content(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    if isinstance(content, list):
        if not all(isinstance(b, dict) for b in content):
            raise bad_request(
                f"{where}: tool_result content must be a string or blocks", param=where
            )
        content = "".join(str(b.get("text", "")) for b in content if b.get("type") == "text")
    text = str(content)
    return f"Error: {text}" if block.get("is_error") else text


def _convert_message(index: int, message: AnthropicMessage) -> list[dict[str, Any]]:
    where = f"messages[{index}].content"
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        text, reasoning, calls = [], [], []
        for block in message.content:
            kind = block.get("type")
            if kind == "text":
                text.append(str(block.get("text", "")))
            elif kind == "thinking":
                reasoning.append(str(block.get("thinking", "")))
            elif kind == "redacted_thinking":
                continue
            elif kind == "tool_use":
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {
                            "name": block.get("name"),
                            "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
                        },
                    }
                )
            else:
                raise bad_request(f"{where}: unsupported assistant block {kind!r}", param=where)
        out: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
        if reasoning:
            out["reasoning_content"] = "".join(reasoning)
        if calls:
            out["tool_calls"] = calls
        return [out]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in message.content:
        kind = block.get("type")
        if kind == "tool_result":
            results.append(
                {
                    "role": "tool",
                    "tool_call_id": block.get("tool_use_id"),
                    "content": _tool_result_content(block, where),
                }
            )
        elif kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(_image_part(block, where))
        elif kind == "document":
            raise bad_request(f"{where}: document blocks are not supported", param=where)
        else:
            raise bad_request(f"{where}: unsupported block type {kind!r}", param=where)
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        content: Any = "".join(p["text"] for p in parts) if only_text else parts
        results.append({"role": "user", "content": content})
    return results


def _tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or not tool.get("name"):
        raise bad_request(f"tools[{index}]: a tool needs a name", param=f"tools[{index}].name")
    return {
        "type": "function",
        "function": {
            "name": tool["name"],
            "description": tool.get("description", ""),
            "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
        },
    }


def _tool_choice(choice: dict[str, Any]) -> Any:
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request(f"unsupported tool_choice {choice!r}", param="tool_choice")


def _messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        system = (
            req.system if isinstance(req.system, str) else _text_of_blocks(req.system, "system")
        )
        out.append({"role": "system", "content": system})
    for index, message in enumerate(req.messages):
        out.extend(_convert_message(index, message))
    return out


def thinking_enabled(thinking: dict[str, Any] | None) -> bool:
    return bool(thinking) and thinking.get("type") == "enabled"  # type: ignore[union-attr]


def to_openai(req: MessagesRequest, model_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_id,
        "messages": _messages(req),
        "max_tokens": req.max_tokens,
        "chat_template_kwargs": {"enable_thinking": thinking_enabled(req.thinking)},
    }
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p", "top_k"):
        value = getattr(req, key)
        if value is not None:
            body[key] = value
    if req.stop_sequences:
        body["stop"] = req.stop_sequences
    if req.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(req.tools)]
    if req.tool_choice:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    if req.metadata and req.metadata.get("user_id"):
        body["user"] = str(req.metadata["user_id"])
    return body


def to_tokenize(req: CountTokensRequest, model_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_id,
        "messages": _messages(req),
        "chat_template_kwargs": {"enable_thinking": thinking_enabled(req.thinking)},
    }
    if req.tools:
        body["tools"] = [_tool(t, i) for i, t in enumerate(req.tools)]
    return body


# --- response ---------------------------------------------------------------------------------


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def stop_reason(finish: str | None, stop_sequence: Any) -> tuple[str, str | None]:
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(stop_sequence, str) and stop_sequence:
        return "stop_sequence", stop_sequence
    return "end_turn", None


def from_openai(resp: dict[str, Any], requested_model: str) -> dict[str, Any]:
    choice = resp["choices"][0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append(
            {"type": "thinking", "thinking": message["reasoning_content"], "signature": ""}
        )
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                "name": function.get("name", ""),
                "input": tool_input(function.get("arguments") or ""),
            }
        )
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"))
    usage = resp.get("usage") or {}
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": requested_model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {
            "input_tokens": usage.get("prompt_tokens", 0),
            "output_tokens": usage.get("completion_tokens", 0),
        },
    }


# --- streaming --------------------------------------------------------------------------------

Event = tuple[str, dict[str, Any]]


def render(events: list[Event]) -> bytes:
    return b"".join(
        b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
        for name, data in events
    )


PING: Event = ("ping", {"type": "ping"})


class StreamTranslator:
    """Feeds on OpenAI chat chunks, emits the Anthropic event sequence.

    message_start → (content_block_start → content_block_delta* → content_block_stop)*
    → message_delta (stop_reason, usage) → message_stop. Blocks open lazily and close
    when the kind of output changes: thinking, text, one tool_use per call.
    """

    def __init__(self, requested_model: str) -> None:
        self.model = requested_model
        self.id = message_id()
        self._index = -1
        self._open: str | None = None  # "thinking" | "text" | "tool_use"
        self._tool_index: int | None = None  # OpenAI index of the open tool call
        self._finish: str | None = None
        self._stop_sequence: Any = None
        self._usage: dict[str, Any] = {}

    def start(self) -> list[Event]:
        return [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": self.id,
                        "type": "message",
                        "role": "assistant",
                        "model": self.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 0, "output_tokens": 0},
                    },
                },
            ),
            PING,
        ]

    def _close(self, out: list[Event]) -> None:
        if self._open is not None:
            out.append(("content_block_stop", {"type": "content_block_stop", "index": self._index}))
            self._open = None
            self._tool_index = None

    def _begin(self, out: list[Event], block: dict[str, Any]) -> None:
        self._close(out)
        self._index += 1
        self._open = block["type"]
        out.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": self._index, "content_block": block},
            )
        )

    def _delta(self, out: list[Event], delta: dict[str, Any]) -> None:
        out.append(
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": self._index, "delta": delta},
            )
        )

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        out: list[Event] = []
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self._open != "thinking":
                    self._begin(out, {"type": "thinking", "thinking": "", "signature": ""})
                self._delta(out, {"type": "thinking_delta", "thinking": delta["reasoning_content"]})
            if delta.get("content"):
                if self._open != "text":
                    self._begin(out, {"type": "text", "text": ""})
                self._delta(out, {"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                index = call.get("index", 0)
                if self._open != "tool_use" or index != self._tool_index:
                    self._begin(
                        out,
                        {
                            "type": "tool_use",
                            "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                            "name": function.get("name") or "",
                            "input": {},
                        },
                    )
                    self._tool_index = index
                if function.get("arguments"):
                    self._delta(
                        out, {"type": "input_json_delta", "partial_json": function["arguments"]}
                    )
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                self._stop_sequence = choice.get("stop_reason")
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        self._close(out)
        reason, sequence = stop_reason(self._finish, self._stop_sequence)
        out.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": {
                        "input_tokens": self._usage.get("prompt_tokens", 0),
                        "output_tokens": self._usage.get("completion_tokens", 0),
                    },
                },
            )
        )
        out.append(("message_stop", {"type": "message_stop"}))
        return out

    @property
    def usage(self) -> dict[str, Any]:
        return self._usage

    @staticmethod
    def error(status: int, message: str) -> list[Event]:
        return [("error", error_body(status, message))]
