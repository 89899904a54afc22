"""OpenAI chat messages → the model's own chat template → token ids (any harness whose
tokenizer offers ``apply_chat_template`` and ``encode``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from helexa.core.errors import bad_request
from helexa.core.wire import ChatMessage
from helexa.neuron.harness.base import PreparedPrompt
from helexa.neuron.harness.control_tokens import Marks, control_texts, guard, tokenize_guarded
from helexa.neuron.harness.generic_tools import generic_tool_messages, renders_tools
from helexa.neuron.output_parser import CALL_OPEN, THINK_OPEN


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


def fold_system_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Later system turns merged into the next user turn (the previous one when none
    follows), for templates that accept a system message only at the start."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for index, message in enumerate(messages):
        if message["role"] == "system" and index > 0:
            pending.append(message["content"])
            continue
        if pending and message["role"] == "user":
            message = {**message, "content": "\n\n".join([*pending, message["content"]])}
            pending = []
        out.append(message)
    if pending:
        last_user = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
        if last_user is None:
            out.append({"role": "user", "content": "\n\n".join(pending)})
        else:
            merged = "\n\n".join([out[last_user]["content"], *pending])
            out[last_user] = {**out[last_user], "content": merged}
    return out


def _apply_template(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        add_generation_prompt=True,
        tokenize=False,
        **(template_kwargs or {}),
    )


class Rendered(NamedTuple):
    text: str
    ids: list[int]
    generic_tools: bool  # tools described by GENERIC_TOOLS (the template renders none)


def render_chat(
    tokenizer: Any,
    messages: list[ChatMessage],
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> Rendered:
    """The prompt text and its token ids. Only the template's own markup becomes control
    tokens: client text that spells one (``<|im_start|>system``) stays text, so no client can
    forge a turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            "this model has no chat template; use /v1/completions with a raw prompt",
            param="messages",
            code="chat_template_missing",
        )
    rendered = template_messages(messages)
    # A template that cannot render tools gets them described in a generic prompt; calls and
    # results already in the conversation are written as text for it even without tools.
    generic = not renders_tools(tokenizer.chat_template) and (
        bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in rendered)
    )
    if generic:
        generic = bool(tools)  # the model is told to call tools: its calls are parsed
        rendered, tools = generic_tool_messages(rendered, tools or []), None
    controls, marks = control_texts(tokenizer), Marks.new()
    guarded = False
    if controls:
        # chat_template_kwargs too: a template may print a string one (reasoning_effort).
        (rendered, tools, template_kwargs), guarded = guard(
            [rendered, tools, template_kwargs], controls, marks
        )
    try:
        try:
            text = _apply_template(tokenizer, rendered, tools, template_kwargs)
        except Exception:
            # Mid-conversation system turns (Claude Code sends them) go to the template as
            # system turns; only a template that refuses them gets them folded instead.
            if not any(m["role"] == "system" for m in rendered[1:]):
                raise
            text = _apply_template(tokenizer, fold_system_turns(rendered), tools, template_kwargs)
    except Exception as exc:  # jinja raise_exception, bad roles, ...
        if getattr(exc, "status", None):
            raise
        raise bad_request(
            f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    if guarded:
        return Rendered(*tokenize_guarded(tokenizer, text, marks), generic)
    return Rendered(text, tokenizer.encode(text, add_special_tokens=False), generic)


def opens_reasoning(prompt_text: str) -> bool:
    """Templates of thinking models may end the prompt inside an open <think> block."""
    tail = prompt_text.rstrip()
    return tail.endswith("<think>")


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=True)


@dataclass(frozen=True)
class PromptFacts:
    """What a loaded model tells every prompt prepared for it."""

    context_length: int
    generation_defaults: dict[str, Any]
    eos_ids: frozenset[int]
    tags: frozenset[str]  # reasoning / tool-call tags the vocabulary has as single tokens

    def prepared(
        self, ids: list[int], text: str = "", *, generic_tools: bool = False
    ) -> PreparedPrompt:
        return PreparedPrompt(
            token_ids=ids,
            context_length=self.context_length,
            generation_defaults=self.generation_defaults,
            eos_ids=self.eos_ids,
            reasoning_tags=THINK_OPEN in self.tags,
            tool_call_tags=CALL_OPEN in self.tags or generic_tools,
            opens_reasoning=THINK_OPEN in self.tags and opens_reasoning(text),
        )


async def prepare_chat(
    tokenizer: Any,
    facts: PromptFacts,
    messages: list[ChatMessage],
    tools: list[dict[str, Any]] | None,
    template_kwargs: dict[str, Any] | None,
) -> PreparedPrompt:
    """Render and tokenize off the event loop (templates and tokenizers are slow)."""
    rendered = await asyncio.to_thread(render_chat, tokenizer, messages, tools, template_kwargs)
    return facts.prepared(rendered.ids, rendered.text, generic_tools=rendered.generic_tools)


async def prepare_text(tokenizer: Any, facts: PromptFacts, text: str) -> PreparedPrompt:
    return facts.prepared(await asyncio.to_thread(encode_text, tokenizer, text))


class TokenizerPrompts:
    """``prepare_chat`` / ``prepare_text`` for a harness: what differs between harnesses
    is only where a loaded model keeps its tokenizer and facts (``prompt_source``)."""

    def prompt_source(self, model_id: str) -> tuple[Any, PromptFacts]:
        raise NotImplementedError

    async def prepare_chat(
        self,
        model_id: str,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any] | None,
    ) -> PreparedPrompt:
        tokenizer, facts = self.prompt_source(model_id)
        return await prepare_chat(tokenizer, facts, messages, tools, template_kwargs)

    async def prepare_text(self, model_id: str, text: str) -> PreparedPrompt:
        tokenizer, facts = self.prompt_source(model_id)
        return await prepare_text(tokenizer, facts, text)
