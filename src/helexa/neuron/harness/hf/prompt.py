"""OpenAI chat messages → the model's own chat template → token ids."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from helexa.core.errors import bad_request
from helexa.core.wire import ChatMessage


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append(str(part.get("text", "")))
        else:
            raise bad_request(
                f"content part type {kind!r} is not supported by this text-only model",
                param=f"messages[{index}].content",
            )
    return "".join(parts)


def _template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """Templates expect arguments as a mapping; OpenAI sends a JSON string."""
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        # Malformed arguments stay text; the template renders them verbatim.
        with contextlib.suppress(ValueError):
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
    return {**call, "function": function}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    rendered = []
    for index, message in enumerate(messages):
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _text_of(message.content, index),
        }
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [_template_tool_call(c) for c in message.tool_calls]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        if message.reasoning_content:
            entry["reasoning_content"] = message.reasoning_content
        rendered.append(entry)
    return rendered


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> tuple[str, list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model has no chat template; use /v1/completions with a raw prompt",
            param="messages",
            code="chat_template_missing",
        )
    try:
        text = tokenizer.apply_chat_template(
            template_messages(messages),
            tools=tools or None,
            add_generation_prompt=True,
            tokenize=False,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # jinja raise_exception, bad roles, ...
        if getattr(exc, "status", None):
            raise
        raise bad_request(
            f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    return text, tokenizer.encode(text, add_special_tokens=False)


def opens_reasoning(prompt_text: str) -> bool:
    """Templates of thinking models may end the prompt inside an open <think> block."""
    tail = prompt_text.rstrip()
    return tail.endswith("<think>")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=True)
