"""OpenAI chat messages → the model's own chat template → token ids (any harness whose
tokenizer offers ``apply_chat_template`` and ``encode``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import secrets
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

from helexa.core.errors import bad_request
from helexa.core.wire import ChatMessage
from helexa.neuron.harness.base import PreparedPrompt
from helexa.neuron.output_parser import CALL_CLOSE, CALL_OPEN, THINK_OPEN


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


_control_cache: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Marks:
    """What client text that spells a control token is wrapped in while the template renders,
    so the rendered prompt shows where it lies: private-use code points around a random
    nonce, new for each prompt, so no client text can close or open a mark of its own."""

    open: str
    close: str

    @classmethod
    def new(cls) -> _Marks:
        nonce = secrets.token_hex(8)
        return cls(f"\ue000{nonce}\ue000", f"\ue001{nonce}\ue001")

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(f"{re.escape(self.open)}(.*?){re.escape(self.close)}", re.DOTALL)


def control_texts(tokenizer: Any) -> tuple[str, ...]:
    """How the tokenizer's control tokens are written (``<|im_start|>``, ``<|endoftext|>``):
    a GGUF vocabulary lists them itself; for transformers, its special added tokens."""
    own = getattr(tokenizer, "control_texts", None)
    if own is not None:
        return tuple(own)
    cached = _control_cache.get(tokenizer)
    if cached is None:
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        cached = tuple(sorted({t.content for t in decoder.values() if t.special and t.content}))
        _control_cache[tokenizer] = cached
    return cached


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """``text`` as plain text: a control token written in it is not that token."""
    own = getattr(tokenizer, "encode_plain", None)
    if own is not None:
        return own(text)
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


@functools.lru_cache(maxsize=16)
def _spelling_any(controls: tuple[str, ...]) -> re.Pattern[str]:
    """One scan finds any of a vocabulary's control tokens (some have hundreds)."""
    return re.compile("|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)))


def _guard(value: Any, controls: tuple[str, ...], marks: _Marks) -> tuple[Any, bool]:
    """``value`` with every string (keys too) that spells a control token wrapped in
    ``marks``; whether any was."""
    if isinstance(value, str):
        if _spelling_any(controls).search(value):
            return f"{marks.open}{value}{marks.close}", True
        return value, False
    if isinstance(value, dict):
        pairs = [(_guard(k, controls, marks), _guard(v, controls, marks)) for k, v in value.items()]
        guarded = {k: v for (k, _), (v, _) in pairs}
        return guarded, any(a or b for (_, a), (_, b) in pairs)
    if isinstance(value, list):
        items = [_guard(v, controls, marks) for v in value]
        return [v for v, _ in items], any(hit for _, hit in items)
    return value, False


def _tokenize_guarded(tokenizer: Any, text: str, marks: _Marks) -> tuple[str, list[int]]:
    """A prompt rendered from wrapped client text: the template's markup tokenized with its
    control tokens, the client's text as plain text. A template that cut a mark apart (or
    dropped one end of it) leaves client text unmarked: refused, never guessed at."""
    pieces = marks.pattern.split(text)  # markup, client, markup, client, ..., markup
    markup = pieces[0::2]
    if any("\ue000" in m or "\ue001" in m for m in markup):
        raise bad_request(
            "the chat template cut apart a message that contains control-token text "
            "(such as <|im_start|>); it cannot be rendered safely",
            param="messages",
            code="control_tokens_in_text",
        )
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if not piece:
            continue
        if index % 2:
            ids += encode_plain(tokenizer, piece)
        else:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return "".join(pieces), ids


@functools.lru_cache(maxsize=64)
def renders_tools(template: str) -> bool:
    """Whether a chat template reads ``tools`` at all (SmolLM2's, for one, does not)."""
    import jinja2
    import jinja2.meta

    try:
        return "tools" in jinja2.meta.find_undeclared_variables(
            jinja2.Environment().parse(template)
        )
    except jinja2.TemplateError:
        return True  # not ours to judge: rendering says what is wrong with it


GENERIC_TOOLS = """You can call these tools; each one's arguments follow its JSON Schema:
{tools}

To call a tool, answer with one line per call, each exactly of this form and nothing else:
<tool_call>{{"name": "<tool name>", "arguments": {{<the arguments as JSON>}}}}</tool_call>
The results come back in a message that starts with <tool_response>. When no tool is needed, \
answer directly."""


def generic_tool_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation for a template that cannot render tools (as llama-server's generic
    tool format does): the tools described in the system turn, earlier calls written as
    ``<tool_call>`` lines, results as ``<tool_response>`` user turns. The output parser reads
    the model's ``<tool_call>`` lines back as calls."""
    described = "\n".join(
        json.dumps(
            {
                "name": (tool.get("function") or {}).get("name"),
                "description": (tool.get("function") or {}).get("description", ""),
                "parameters": (tool.get("function") or {}).get("parameters", {}),
            },
            ensure_ascii=False,
        )
        for tool in tools
    )
    preamble = GENERIC_TOOLS.format(tools=described)
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                CALL_OPEN
                + json.dumps(
                    {
                        "name": (call.get("function") or {}).get("name"),
                        "arguments": (call.get("function") or {}).get("arguments", {}),
                    },
                    ensure_ascii=False,
                )
                + CALL_CLOSE
                for call in message["tool_calls"]
            ]
            out.append(
                {"role": "assistant", "content": "\n".join([c for c in [content] if c] + calls)}
            )
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_responses"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + response}
            else:
                out.append({"role": "user", "content": response, "tool_responses": True})
        else:
            out.append({k: v for k, v in message.items() if k != "tool_calls"})
    for message in out:
        message.pop("tool_responses", None)
    if not tools:
        return out
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}"}
    else:
        out.insert(0, {"role": "system", "content": preamble})
    return out


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
    controls, marks = control_texts(tokenizer), _Marks.new()
    guarded = False
    if controls:
        (rendered, tools), guarded = _guard([rendered, tools], controls, marks)
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
        return Rendered(*_tokenize_guarded(tokenizer, text, marks), generic)
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
