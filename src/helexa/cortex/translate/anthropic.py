"""Anthropic Messages ⇄ OpenAI chat completions (§2.8): pure functions and a streaming
state machine, no I/O."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

import orjson
from pydantic import Field

from helexa.core.errors import anthropic_error_body, bad_request
from helexa.core.stream import (
    Finish,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    ToolCallDelta,
    Usage,
    chunk_events,
    openai_usage,
)
from helexa.core.wire import MAX_MESSAGES, MAX_STOP, MAX_TOOLS, ClientModelName, StreamFlag, Wire
from helexa.cortex.translate.tool_set import HostedTools, ToolSet, leave_out

# --- wire types -------------------------------------------------------------------------------


class AnthropicMessage(Wire):
    # Claude Code 2.x sends mid-conversation "system" turns inside ``messages``.
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class MessagesRequest(Wire):
    model: ClientModelName
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP)
    stream: StreamFlag = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    # effort is accepted (our models have no effort knob); format is structured output.
    output_config: dict[str, Any] | None = None
    # Server-side context editing (e.g. clear_thinking): an optimisation of Anthropic's own
    # cache. Nothing here keeps state between requests, so there is nothing to edit.
    context_management: dict[str, Any] | None = None


class CountTokensRequest(Wire):
    model: ClientModelName
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None


# --- errors -----------------------------------------------------------------------------------


def prompt_too_long(prompt_tokens: int, context_length: int) -> str:
    """Anthropic's wording: Claude Code recognises it and compacts the conversation."""
    return f"prompt is too long: {prompt_tokens} tokens > {context_length} maximum"


def error_from_openai(status: int, raw: bytes) -> dict[str, Any]:
    """An OpenAI error envelope (from a neuron) in Anthropic's shape."""
    try:
        error = orjson.loads(raw)["error"]
        message = error["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = raw.decode(errors="replace")[:500] or f"upstream answered {status}"
        return anthropic_error_body(status, message)
    prompt, context = error.get("prompt_tokens"), error.get("context_length")
    if error.get("code") == "context_length_exceeded" and isinstance(prompt, int) and context:
        message = prompt_too_long(prompt, int(context))
    return anthropic_error_body(status, message)


# --- request ----------------------------------------------------------------------------------

# Claude Code's first system block: per-session billing attribution, not instructions. It
# differs every session, so rendering it would also defeat prefix caching.
BILLING_HEADER = "x-anthropic-billing-header:"


def _system_text(blocks: list[dict[str, Any]], where: str) -> str:
    parts = []
    for index, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise bad_request(
                f"{where}[{index}]: only text blocks are allowed here, got {kind!r}",
                param=where,
            )
        text = str(block.get("text", ""))
        if not text.startswith(BILLING_HEADER):
            parts.append(text)
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


def _tool_reference(item: dict[str, Any], tools: ToolSet, loaded: set[str]) -> str:
    """A ``tool_reference`` (Claude Code's ToolSearch result) expanded where it stands, as
    Anthropic expands it: the deferred tool's full definition in the ``<functions>`` form
    ToolSearch's description promises. The tool list at the top of the prompt stays as it
    was, so loading a tool never invalidates the conversation's cached prefix.

    Each tool's definition is written once per conversation, where it is first named
    (``loaded``): a later reference points back to it. Else a request of a few hundred
    kilobytes (one large definition, thousands of references) would expand to gigabytes."""
    name = item.get("tool_name")
    function = tools.deferred.get(name) if isinstance(name, str) else None
    if function is None:
        return f"<functions></functions>\n(no deferred tool named {name!r} was sent)"
    if name in loaded:
        return f"<functions></functions>\n(tool {name!r} is loaded: its definition is above)"
    loaded.add(name)
    definition = json.dumps(function, ensure_ascii=False)
    return f"<functions>\n<function>{definition}</function>\n</functions>"


def _tool_result_content(
    block: dict[str, Any], where: str, tools: ToolSet, loaded: set[str]
) -> str | list[dict[str, Any]]:
    """A tool result's text, or content parts when it carries images: those travel on to
    the model, which takes them or refuses them by name — never silently dropped."""
    content = block.get("content", "")
    prefix = "Error: " if block.get("is_error") else ""
    if not isinstance(content, list):
        return prefix + str(content)
    parts: list[dict[str, Any]] = []
    for index, item in enumerate(content):
        if not isinstance(item, dict):
            raise bad_request(
                f"{where}: tool_result content must be a string or blocks", param=where
            )
        kind = item.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(item.get("text", ""))})
        elif kind == "image":
            parts.append(_image_part(item, f"{where}.tool_result[{index}]"))
        elif kind == "tool_reference":
            parts.append({"type": "text", "text": _tool_reference(item, tools, loaded)})
        else:
            raise bad_request(
                f"{where}: unsupported block type {kind!r} inside a tool_result", param=where
            )
    if all(part["type"] == "text" for part in parts):
        return prefix + "".join(part["text"] for part in parts)
    return ([{"type": "text", "text": prefix}] if prefix else []) + parts


def _convert_message(
    index: int, message: AnthropicMessage, tools: ToolSet, loaded: set[str]
) -> list[dict[str, Any]]:
    where = f"messages[{index}].content"
    if message.role == "system":
        text = (
            message.content
            if isinstance(message.content, str)
            else _system_text(message.content, where)
        )
        return [{"role": "system", "content": text}]
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
                continue  # encrypted reasoning of another model: unreadable by ours
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
                    "content": _tool_result_content(block, where, tools, loaded),
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


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool["name"],
            "description": tool.get("description", ""),
            "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
        },
    }


def tool_set(tools: list[dict[str, Any]] | None, hosted: HostedTools = "reject") -> ToolSet:
    """Custom tools as chat function tools. Server tools (web_search_*, code_execution_*,
    …) run on Anthropic's side and Anthropic-defined client tools (bash_*, text_editor_*,
    …) have no schema here: neither exists on this fleet, so they are left out
    (``hosted="omit"``) or refused with a 400 naming them."""
    chat: list[dict[str, Any]] = []
    omitted: list[str] = []
    deferred: dict[str, dict[str, Any]] = {}
    withheld: set[str] = set()
    for index, tool in enumerate(tools or []):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or not tool.get("name") or not isinstance(tool["name"], str):
            raise bad_request(f"{where}: a tool needs a name (a string)", param=f"{where}.name")
        kind = tool.get("type")
        if kind in (None, "custom") and tool.get("defer_loading") is True:
            # Claude Code's tool search: shown to the model only once a tool_reference
            # in a ToolSearch result names it (expanded there: _tool_reference).
            deferred[tool["name"]] = _tool(tool)["function"]
            continue
        if kind in (None, "custom"):
            chat.append(_tool(tool))
            continue
        why = (
            f"tool {tool['name']!r} is of type {kind!r}, a server or Anthropic-defined tool "
            "that this gateway does not provide; only custom tools with an input_schema are "
            "supported"
        )
        omitted.append(leave_out(hosted, kind, f"{where}.type", why))
        withheld.add(tool["name"])
    return ToolSet(chat, tuple(omitted), deferred=deferred, withheld=frozenset(withheld))


def _tool_choice(choice: dict[str, Any], tools: ToolSet) -> Any:
    kind = choice.get("type")
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and choice.get("name") and isinstance(choice["name"], str):
        if choice["name"] in tools.withheld:
            raise bad_request(
                f"tool_choice names {choice['name']!r}, a server tool this gateway leaves out "
                "(x-helexa-omitted-tools): no model here can call it",
                param="tool_choice",
            )
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request(f"unsupported tool_choice {choice!r}", param="tool_choice")


def _messages(req: MessagesRequest | CountTokensRequest, tools: ToolSet) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    loaded: set[str] = set()  # deferred tools whose definition is written (_tool_reference)
    if req.system:
        system = req.system if isinstance(req.system, str) else _system_text(req.system, "system")
        if system:
            out.append({"role": "system", "content": system})
    for index, message in enumerate(req.messages):
        out.extend(_convert_message(index, message, tools, loaded))
    return out


THINKING_ON = frozenset({"enabled", "adaptive"})
THINKING_OFF = frozenset({"disabled"})


def thinking_enabled(thinking: dict[str, Any] | None) -> bool:
    """``enabled`` and ``adaptive`` turn reasoning on; ``disabled`` or absent, off.
    ``budget_tokens`` is accepted: the models here think until they close the block."""
    if not thinking:
        return False
    kind = thinking.get("type")
    if kind in THINKING_ON:
        return True
    if kind in THINKING_OFF:
        return False
    raise bad_request(
        f"thinking.type must be one of enabled, adaptive, disabled; got {kind!r}",
        param="thinking.type",
    )


def response_format(output_config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``output_config.format`` (Anthropic structured output) as OpenAI ``response_format``."""
    if not output_config:
        return None
    effort = output_config.get("effort")
    if effort is not None and effort not in ("low", "medium", "high", "max"):
        raise bad_request(
            f"output_config.effort must be low, medium, high or max; got {effort!r}",
            param="output_config.effort",
        )
    fmt = output_config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise bad_request(
            f"output_config.format.type must be 'json_schema', got {kind!r}",
            param="output_config.format",
        )
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise bad_request(
            "output_config.format.schema must be a JSON schema object",
            param="output_config.format.schema",
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


def to_openai(req: MessagesRequest, model_id: str, tools: ToolSet | None = None) -> dict[str, Any]:
    """The chat request for ``req``; ``tools`` is its ``tool_set`` (by default a server
    tool is refused)."""
    tools = tool_set(req.tools) if tools is None else tools
    body: dict[str, Any] = {
        "model": model_id,
        "messages": _messages(req, tools),
        "max_tokens": req.max_tokens,
        "fit_max_tokens": True,  # chosen for Claude, not for this model: clamp, no 400
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
    # Tool search needs tools the model sees from the start (ToolSearch itself): with none,
    # the deferred ones are sent whole, or their calls would not be parsed at all.
    chat_tools = tools.tools or [
        {"type": "function", "function": function} for function in tools.deferred.values()
    ]
    if req.tool_choice:
        body["tool_choice"] = _tool_choice(req.tool_choice, tools)
        forced = req.tool_choice.get("name")
        if isinstance(forced, str) and forced in tools.deferred and tools.tools:  # load it
            chat_tools = [*chat_tools, {"type": "function", "function": tools.deferred[forced]}]
    if chat_tools:
        body["tools"] = chat_tools
    fmt = response_format(req.output_config)
    if fmt is not None:
        body["response_format"] = fmt
    if req.metadata and req.metadata.get("user_id"):
        body["user"] = str(req.metadata["user_id"])
    return body


def to_tokenize(
    req: CountTokensRequest, model_id: str, tools: ToolSet | None = None
) -> dict[str, Any]:
    tools = tool_set(req.tools) if tools is None else tools
    body: dict[str, Any] = {
        "model": model_id,
        "messages": _messages(req, tools),
        "chat_template_kwargs": {"enable_thinking": thinking_enabled(req.thinking)},
    }
    if tools.tools:
        body["tools"] = tools.tools
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


def stop_reason(finish: Finish | None) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for an OpenAI finish (None: none came)."""
    if finish is None:
        return "end_turn", None
    if finish.reason == "tool_calls":
        return "tool_use", None
    if finish.reason == "length":
        return "max_tokens", None
    if finish.stop_sequence:
        return "stop_sequence", finish.stop_sequence
    return "end_turn", None


def from_openai(resp: dict[str, Any], requested_model: str) -> dict[str, Any]:
    if not resp["choices"]:  # malformed: the relay answers 502
        raise IndexError("a chat completion without a choice")
    content: list[dict[str, Any]] = []
    finish: Finish | None = None
    usage = Usage()
    for event in chunk_events(resp):  # reasoning, text, calls: the blocks' order
        if isinstance(event, ReasoningDelta):
            content.append({"type": "thinking", "thinking": event.text, "signature": ""})
        elif isinstance(event, TextDelta):
            content.append({"type": "text", "text": event.text})
        elif isinstance(event, ToolCallDelta):
            content.append(
                {
                    "type": "tool_use",
                    "id": event.id or f"toolu_{uuid.uuid4().hex}",
                    "name": event.name or "",
                    "input": tool_input(event.arguments),
                }
            )
        elif isinstance(event, Finish):
            finish = event
        elif isinstance(event, Usage):
            usage = event
    reason, sequence = stop_reason(finish)
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": requested_model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens},
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
    """Feeds on the events of OpenAI chat chunks (``chunk_events``), emits the Anthropic
    event sequence.

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
        self._finish: Finish | None = None
        self._usage: Usage | None = None
        self._started = False

    def start(self, input_tokens: int = 0) -> list[Event]:
        """``message_start`` (with the prompt's token count when known) and a ping. Called
        by ``feed`` on the first chunk, whose usage carries the count, if not before."""
        self._started = True
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
                        "usage": {"input_tokens": input_tokens, "output_tokens": 0},
                    },
                },
            ),
            PING,
        ]

    def ping(self) -> list[Event]:
        """A keep-alive; the stream's opening first if nothing was sent yet."""
        return [PING] if self._started else self.start()

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

    def feed(self, events: list[StreamEvent]) -> list[Event]:
        """The events of one chunk. On the first, ``message_start`` takes the prompt's
        token count from its usage (the neuron's opening chunk carries it)."""
        out: list[Event] = []
        if not self._started:
            usage = next((e for e in events if isinstance(e, Usage)), None)
            out += self.start(usage.input_tokens if usage else 0)
        for event in events:
            if isinstance(event, TextDelta):
                if self._open != "text":
                    self._begin(out, {"type": "text", "text": ""})
                self._delta(out, {"type": "text_delta", "text": event.text})
            elif isinstance(event, ReasoningDelta):
                if self._open != "thinking":
                    self._begin(out, {"type": "thinking", "thinking": "", "signature": ""})
                self._delta(out, {"type": "thinking_delta", "thinking": event.text})
            elif isinstance(event, ToolCallDelta):
                index = event.index or 0
                if self._open != "tool_use" or index != self._tool_index:
                    self._begin(
                        out,
                        {
                            "type": "tool_use",
                            "id": event.id or f"toolu_{uuid.uuid4().hex[:24]}",
                            "name": event.name or "",
                            "input": {},
                        },
                    )
                    self._tool_index = index
                if event.arguments:
                    self._delta(out, {"type": "input_json_delta", "partial_json": event.arguments})
            elif isinstance(event, Finish):
                self._finish = event
            elif isinstance(event, Usage):
                self._usage = event
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = [] if self._started else self.start()
        self._close(out)
        reason, sequence = stop_reason(self._finish)
        usage = self._usage or Usage()
        out.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": {
                        "input_tokens": usage.input_tokens,
                        "output_tokens": usage.output_tokens,
                    },
                },
            )
        )
        out.append(("message_stop", {"type": "message_stop"}))
        return out

    @property
    def usage(self) -> dict[str, Any]:
        """The latest usage, as OpenAI reports it (for the access log and metrics)."""
        return {} if self._usage is None else openai_usage(self._usage)

    @staticmethod
    def error(status: int, message: str) -> list[Event]:
        return [("error", anthropic_error_body(status, message))]
