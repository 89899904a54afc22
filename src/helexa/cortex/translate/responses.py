"""OpenAI Responses ⇄ OpenAI chat completions: pure functions and a streaming state machine,
no I/O. Modelled on ``cortex.translate.anthropic``; errors travel in the plain OpenAI
envelope (``ApiError.openai_body()``)."""

from __future__ import annotations

import copy
import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field

from helexa.core.errors import bad_request
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
from helexa.core.wire import MAX_MESSAGES, MAX_TOOLS, ClientModelName, StreamFlag, Wire
from helexa.cortex.translate.anthropic import Event, render
from helexa.cortex.translate.tool_set import HostedTools, ToolSet, leave_out

__all__ = [
    "KEEPALIVE",
    "Event",
    "ResponsesRequest",
    "StreamTranslator",
    "ToolSet",
    "error_code",
    "from_openai",
    "reasoning_enabled",
    "render",
    "response_format",
    "response_id",
    "to_openai",
    "tool_set",
]

# --- wire types -------------------------------------------------------------------------------


class ResponsesRequest(Wire):
    model: ClientModelName
    # Optional on the wire (previous_response_id / prompt may stand in for it); to_openai
    # refuses those first so the client hears the real reason.
    input: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: StreamFlag = False
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    include: list[str] | None = None
    # Server-side state that cortex does not keep: refused by to_openai.
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: bool | None = None


# --- request ----------------------------------------------------------------------------------

NO_STATE = (
    "cortex keeps no conversation state (responses are not stored); "
    "send the whole conversation in `input` instead"
)
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
SUMMARIES = ("auto", "concise", "detailed")
TEXT_PARTS = ("input_text", "output_text", "text")


def _refuse_state(req: ResponsesRequest) -> None:
    if req.previous_response_id:
        raise bad_request(
            f"previous_response_id is not supported: {NO_STATE}", param="previous_response_id"
        )
    if req.conversation:
        raise bad_request(f"conversation is not supported: {NO_STATE}", param="conversation")
    if req.prompt:
        raise bad_request(
            "prompt templates are not supported: cortex stores no prompts; send `instructions` "
            "and `input` instead",
            param="prompt",
        )
    if req.background:
        raise bad_request(
            "background responses are not supported: cortex stores no responses to poll; "
            "use stream=true for long generations",
            param="background",
        )


def _image_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    url = part.get("image_url")
    if not url:
        # file_id points into OpenAI's file store, which does not exist here.
        raise bad_request(
            f"{where}: input_image needs image_url (a URL or a data: URL); file_id is not "
            "supported",
            param=where,
        )
    image: dict[str, Any] = {"url": url}
    if part.get("detail") in ("low", "high"):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _parts(content: Any, where: str, *, images: bool) -> str | list[dict[str, Any]]:
    """Message or tool-output content as chat content: a string when it is all text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: content must be a string or a list of parts", param=where)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind in TEXT_PARTS:
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "refusal":  # an earlier assistant refusal, replayed as what it said
            parts.append({"type": "text", "text": str(part.get("refusal", ""))})
        elif kind == "input_image" and images:
            parts.append(_image_part(part, f"{where}[{index}]"))
        else:
            raise bad_request(f"{where}[{index}]: unsupported content part {kind!r}", param=where)
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


class _AssistantTurn:
    """Consecutive reasoning / message / function_call items: one chat assistant message,
    which is how chat templates expect reasoning and tool calls to sit."""

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.text: str | None = None
        self.calls: list[dict[str, Any]] = []

    @property
    def spoke(self) -> bool:
        return self.text is not None or bool(self.calls)

    def message(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.reasoning:
            out["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            out["tool_calls"] = self.calls
        return out


def _call(item: dict[str, Any], where: str, tools: ToolSet) -> dict[str, Any]:
    if not item.get("call_id") or not item.get("name"):
        raise bad_request(f"{where}: a function_call needs call_id and name", param=where)
    namespace = item.get("namespace")
    name = tools.visible(str(item["name"]), namespace if isinstance(namespace, str) else None)
    arguments = item.get("arguments", "")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _call_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    if not item.get("call_id"):
        raise bad_request(f"{where}: a function_call_output needs call_id", param=where)
    output = item.get("output", "")
    return {
        "role": "tool",
        "tool_call_id": item["call_id"],
        # Images in a tool's output travel on to the model, never silently dropped.
        "content": _parts(output, f"{where}.output", images=True),
    }


def _input_messages(items: list[dict[str, Any]], tools: ToolSet) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    turn: _AssistantTurn | None = None

    def flush() -> None:
        nonlocal turn
        if turn is not None and turn.spoke:  # a lone reasoning item says nothing to replay
            out.append(turn.message())
        turn = None

    for index, item in enumerate(items):
        where = f"input[{index}]"
        kind = item.get("type") or ("message" if "role" in item else None)
        role = item.get("role")
        if kind == "reasoning":
            if turn is not None and turn.spoke:
                flush()
            turn = turn or _AssistantTurn()
            # summary is a summary of the reasoning, not the reasoning; encrypted_content
            # belongs to another provider's model.
            turn.reasoning += [
                str(part.get("text", ""))
                for part in item.get("content") or []
                if isinstance(part, dict) and part.get("type") == "reasoning_text"
            ]
        elif kind == "message" and role == "assistant":
            if turn is not None and turn.spoke:
                flush()
            turn = turn or _AssistantTurn()
            text = _parts(item.get("content", ""), f"{where}.content", images=False)
            turn.text = text if isinstance(text, str) else ""
        elif kind == "function_call":
            turn = turn or _AssistantTurn()
            turn.calls.append(_call(item, where, tools))
        elif kind == "function_call_output":
            flush()
            out.append(_call_output(item, where))
        elif kind == "message" and role in ("user", "system", "developer"):
            flush()
            if "content" not in item:
                raise bad_request(f"{where}: a message needs content", param=where)
            images = role == "user"
            out.append(
                {
                    "role": role,
                    "content": _parts(item["content"], f"{where}.content", images=images),
                }
            )
        elif kind == "message":
            raise bad_request(f"{where}: unsupported message role {role!r}", param=where)
        elif kind == "item_reference":
            raise bad_request(f"{where}: item_reference is not supported: {NO_STATE}", param=where)
        else:
            raise bad_request(f"{where}: unsupported input item type {kind!r}", param=where)
    flush()
    return out


def _messages(req: ResponsesRequest, tools: ToolSet) -> list[dict[str, Any]]:
    if req.input is None or req.input == [] or req.input == "":
        raise bad_request("input is required", param="input")
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        out.append({"role": "user", "content": req.input})
    else:
        out += _input_messages(req.input, tools)
    return out


# Why a tool type other than function and namespace is refused (hosted_tools = "reject").
FUNCTION_ONLY = "cortex serves only function tools (alone or in a namespace)"


def _function(tool: dict[str, Any], where: str) -> dict[str, Any]:
    if not tool.get("name") or not isinstance(tool["name"], str):
        hint = (
            " (Responses function tools are flat: no nested 'function')"
            if "function" in tool
            else ""
        )
        raise bad_request(f"{where}: a function tool needs a name{hint}", param=f"{where}.name")
    function: dict[str, Any] = {
        "name": tool["name"],
        "description": tool.get("description") or "",
        "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
    }
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return function


def _visible_name(space: str, name: str, taken: set[str]) -> str:
    """A namespaced tool keeps its own name (the one the client's instructions use) unless
    another tool has it; then ``namespace__name`` (numbered if even that is taken)."""
    candidate, number = name, 1
    while candidate in taken:
        candidate = f"{space}__{name}" + (f"_{number}" if number > 1 else "")
        number += 1
    return candidate


def tool_set(tools: list[dict[str, Any]] | None, hosted: HostedTools = "reject") -> ToolSet:
    """Function tools, and the function tools inside ``namespace`` groups, as chat tools;
    every other tool left out (``hosted="omit"``) or refused with a 400 naming it."""
    functions: list[tuple[str | None, dict[str, Any]]] = []
    omitted: list[str] = []
    for index, tool in enumerate(tools or []):
        where = f"tools[{index}]"
        kind = tool.get("type")
        if kind == "function":
            functions.append((None, _function(tool, where)))
        elif kind == "namespace":
            space = tool.get("name")
            if not space or not isinstance(space, str):
                raise bad_request(f"{where}: a namespace needs a name", param=f"{where}.name")
            inner = tool.get("tools")
            if not isinstance(inner, list):
                raise bad_request(
                    f"{where}: a namespace needs a list of tools", param=f"{where}.tools"
                )
            for position, member in enumerate(inner):
                spot = f"{where}.tools[{position}]"
                if not isinstance(member, dict) or member.get("type") != "function":
                    kind = member.get("type") if isinstance(member, dict) else None
                    omitted.append(
                        leave_out(
                            hosted,
                            f"{space}.{member.get('name') if isinstance(member, dict) else ''}",
                            f"{spot}.type",
                            f"tool type {kind!r} is not supported; {FUNCTION_ONLY}",
                        )
                    )
                    continue
                functions.append((space, _function(member, spot)))
        else:
            # Built-in tools (web_search, file_search, computer_use, mcp, …) run on OpenAI's
            # side; nothing on this fleet provides them.
            omitted.append(
                leave_out(
                    hosted,
                    kind,
                    f"{where}.type",
                    f"tool type {kind!r} is not supported; {FUNCTION_ONLY}",
                )
            )
    if len(functions) > MAX_TOOLS:
        raise bad_request(
            f"too many tools: {len(functions)} function tools (namespaces included) > {MAX_TOOLS}",
            param="tools",
        )
    taken = {function["name"] for space, function in functions if space is None}
    origin: dict[str, tuple[str, str]] = {}
    chat: list[dict[str, Any]] = []
    for space, function in functions:
        if space is not None:
            bare = function["name"]
            function = {**function, "name": _visible_name(space, bare, taken)}
            taken.add(function["name"])
            origin[function["name"]] = (space, bare)
        chat.append({"type": "function", "function": function})
    return ToolSet(chat, tuple(omitted), origin)


def _tool_choice(choice: str | dict[str, Any], tools: ToolSet) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name"):
        name = tools.visible(str(choice["name"]), choice.get("namespace"))
        return {"type": "function", "function": {"name": name}}
    raise bad_request(
        f"unsupported tool_choice {choice!r}: use auto, none, required or "
        "{'type': 'function', 'name': ...}",
        param="tool_choice",
    )


def reasoning_enabled(reasoning: dict[str, Any] | None) -> bool:
    """Our models think or not: any real effort turns thinking on, none/minimal/absent off."""
    if not reasoning:
        return False
    effort = reasoning.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise bad_request(
            f"reasoning.effort must be one of {', '.join(EFFORTS)}; got {effort!r}",
            param="reasoning.effort",
        )
    summary = reasoning.get("summary")
    if summary is not None and summary not in SUMMARIES:
        raise bad_request(
            f"reasoning.summary must be one of {', '.join(SUMMARIES)}; got {summary!r}",
            param="reasoning.summary",
        )
    return effort is not None and effort not in ("none", "minimal")


def _text_format(text: dict[str, Any] | None) -> dict[str, Any]:
    """``text.format`` checked and completed, as the response echoes it."""
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise bad_request(
            f"text.format.type must be text, json_object or json_schema; got {kind!r}",
            param="text.format.type",
        )
    if not isinstance(fmt.get("schema"), dict):
        raise bad_request(
            "text.format.schema must be a JSON schema object", param="text.format.schema"
        )
    return {**fmt, "name": fmt.get("name") or "response"}


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as chat ``response_format``; None for plain text."""
    fmt = _text_format(text)
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": fmt["name"], "schema": fmt["schema"]}
    for key in ("strict", "description"):
        if fmt.get(key) is not None:
            schema[key] = fmt[key]
    return {"type": "json_schema", "json_schema": schema}


def to_openai(req: ResponsesRequest, model_id: str, tools: ToolSet | None = None) -> dict[str, Any]:
    """The chat request for ``req``; ``tools`` is its ``tool_set`` (by default every tool
    but a function is refused)."""
    _refuse_state(req)
    tools = tool_set(req.tools) if tools is None else tools
    body: dict[str, Any] = {
        "model": model_id,
        "messages": _messages(req, tools),
        "chat_template_kwargs": {"enable_thinking": reasoning_enabled(req.reasoning)},
    }
    if req.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for key in ("temperature", "top_p", "parallel_tool_calls", "user"):
        value = getattr(req, key)
        if value is not None:
            body[key] = value
    if tools.tools:
        body["tools"] = tools.tools
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice, tools)
    fmt = response_format(req.text)
    if fmt is not None:
        body["response_format"] = fmt
    return body


# --- response ---------------------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_id() -> str:
    return _id("resp")


def _echo(req: ResponsesRequest | None, model: str) -> dict[str, Any]:
    """The request's settings as a Response object repeats them."""
    req = req or ResponsesRequest(model=model)
    reasoning = req.reasoning or {}
    text: dict[str, Any] = {"format": _text_format(req.text)}
    if req.text and req.text.get("verbosity"):
        text["verbosity"] = req.text["verbosity"]
    return {
        "background": False,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": {k: str(v) for k, v in (req.metadata or {}).items()},
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": None,
        "prompt_cache_key": req.prompt_cache_key,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "temperature": req.temperature,
        "text": text,
        "tool_choice": "auto" if req.tool_choice is None else req.tool_choice,
        "tools": list(req.tools or []),
        "top_p": req.top_p,
        "truncation": "disabled",
        "user": req.user,
    }


def _usage(usage: Usage | None) -> dict[str, Any]:
    usage = usage or Usage()
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


Status = Literal["in_progress", "completed", "incomplete", "failed"]


def _envelope(
    rid: str,
    created_at: int,
    model: str,
    echo: dict[str, Any],
    status: Status,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "completed_at": int(time.time()) if status == "completed" else None,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": model,
        "output": output,
        "usage": usage,
        **echo,
    }


def _item(kind: str, **fields: Any) -> dict[str, Any]:
    """A fresh output item; ``_settle`` later writes its text and status in place."""
    if kind == "reasoning":
        return {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [], **fields}
    if kind == "message":
        return {"id": _id("msg"), "type": "message", "role": "assistant", "content": [], **fields}
    return {"id": _id("fc"), "type": "function_call", "arguments": "", **fields}


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": []}


def _settle(item: dict[str, Any], text: str, status: str) -> dict[str, Any]:
    if item["type"] == "function_call":
        item["arguments"] = text
    else:
        item["content"] = [_part(item["type"], text)]
    item["status"] = status
    return item


def from_openai(
    resp: dict[str, Any],
    requested_model: str,
    request: ResponsesRequest | None = None,
    tools: ToolSet | None = None,
) -> dict[str, Any]:
    tools = tools or ToolSet()
    if not resp["choices"]:  # malformed: the relay answers 502
        raise IndexError("a chat completion without a choice")
    output: list[dict[str, Any]] = []
    finish: Finish | None = None
    usage: Usage | None = None
    for event in chunk_events(resp):  # reasoning, text, calls: the items' order
        if isinstance(event, ReasoningDelta):
            output.append(_settle(_item("reasoning"), event.text, "completed"))
        elif isinstance(event, TextDelta):
            output.append(_settle(_item("message"), event.text, "completed"))
        elif isinstance(event, ToolCallDelta):
            item = _item("function_call", call_id=event.id or _id("call"))
            item.update(tools.call_fields(event.name or ""))
            output.append(_settle(item, event.arguments, "completed"))
        elif isinstance(event, Finish):
            finish = event
        elif isinstance(event, Usage):
            usage = event
    status: Status = "incomplete" if finish and finish.reason == "length" else "completed"
    if status == "incomplete" and output:
        output[-1]["status"] = "incomplete"  # the item the token limit cut short
    created = int(resp.get("created") or time.time())
    return _envelope(
        response_id(),
        created,
        requested_model,
        _echo(request, requested_model),
        status,
        output,
        _usage(usage),
    )


# --- streaming --------------------------------------------------------------------------------

# An SSE comment: a keep-alive every SSE client skips (Responses has no ping event).
KEEPALIVE = b": keep-alive\n\n"

ERROR_CODES = {400: "invalid_prompt", 413: "invalid_prompt", 422: "invalid_prompt"}


def error_code(status: int) -> str:
    """A ``ResponseError.code`` (a closed set in the SDK) for an HTTP status."""
    return "rate_limit_exceeded" if status == 429 else ERROR_CODES.get(status, "server_error")


class StreamTranslator:
    """Feeds on the events of OpenAI chat chunks (``chunk_events``), emits the Responses
    event sequence.

    response.created → response.in_progress → per output item: output_item.added →
    [content_part.added] → *.delta* → *.done → [content_part.done] → output_item.done →
    response.completed | response.incomplete. Items open lazily and close when the kind of
    output changes: reasoning, message, one function_call per call. Every event carries a
    ``sequence_number`` that rises by one from 0.
    """

    def __init__(
        self,
        requested_model: str,
        request: ResponsesRequest | None = None,
        tools: ToolSet | None = None,
    ) -> None:
        self.model = requested_model
        self._tools = tools or ToolSet()
        self.id = response_id()
        self.created_at = int(time.time())
        self._echo = _echo(request, requested_model)
        self._sequence = 0
        self._started = False
        self._output: list[dict[str, Any]] = []  # every item so far; the open one is last
        self._open: dict[str, Any] | None = None
        self._text: list[str] = []  # what the open item has said so far
        self._tool_index: int | None = None  # OpenAI index of the open function call
        self._finish: Finish | None = None
        self._usage: Usage | None = None

    def _emit(self, out: list[Event], name: str, **data: Any) -> None:
        out.append((name, {"type": name, "sequence_number": self._sequence, **data}))
        self._sequence += 1

    def _response(
        self, status: Status, usage: dict[str, Any] | None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        # A deep copy: events are rendered after later chunks have changed the items.
        return _envelope(
            self.id,
            self.created_at,
            self.model,
            self._echo,
            status,
            copy.deepcopy(self._output),
            usage,
            error,
        )

    def start(self) -> list[Event]:
        """``response.created`` and ``response.in_progress``. Called by ``feed`` on the first
        chunk, ``finish``, ``error`` or ``ping`` if not before."""
        self._started = True
        out: list[Event] = []
        for name in ("response.created", "response.in_progress"):
            self._emit(out, name, response=self._response("in_progress", None))
        return out

    def ping(self) -> list[Event]:
        """The stream's opening if nothing was sent yet, else nothing: send ``KEEPALIVE``."""
        return [] if self._started else self.start()

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._output) - 1}

    def _close(self, out: list[Event], status: str = "completed") -> None:
        item = self._open
        if item is None:
            return
        text = "".join(self._text)
        _settle(item, text, status)
        where = self._where()
        if item["type"] == "function_call":
            self._emit(out, "response.function_call_arguments.done", **where, arguments=text)
        else:
            part = item["content"][0]
            if item["type"] == "message":
                self._emit(
                    out,
                    "response.output_text.done",
                    **where,
                    content_index=0,
                    text=text,
                    logprobs=[],
                )
            else:
                self._emit(out, "response.reasoning_text.done", **where, content_index=0, text=text)
            self._emit(out, "response.content_part.done", **where, content_index=0, part=dict(part))
        self._emit(
            out,
            "response.output_item.done",
            output_index=where["output_index"],
            item=copy.deepcopy(item),
        )
        self._open = None
        self._tool_index = None

    def _begin(self, out: list[Event], item: dict[str, Any]) -> None:
        self._close(out)
        self._output.append(item)
        self._open = item
        self._text = []
        where = self._where()
        self._emit(
            out,
            "response.output_item.added",
            output_index=where["output_index"],
            item=copy.deepcopy(item),
        )
        if item["type"] != "function_call":
            part = _part(item["type"], "")
            self._emit(out, "response.content_part.added", **where, content_index=0, part=part)

    def _delta(self, out: list[Event], text: str) -> None:
        assert self._open is not None
        self._text.append(text)
        where = self._where()
        kind = self._open["type"]
        if kind == "message":
            self._emit(
                out,
                "response.output_text.delta",
                **where,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        elif kind == "reasoning":
            self._emit(out, "response.reasoning_text.delta", **where, content_index=0, delta=text)
        else:
            self._emit(out, "response.function_call_arguments.delta", **where, delta=text)

    def _kind(self) -> str | None:
        return self._open["type"] if self._open is not None else None

    def feed(self, events: list[StreamEvent]) -> list[Event]:
        """The events of one chunk."""
        out: list[Event] = [] if self._started else self.start()
        for event in events:
            if isinstance(event, TextDelta):
                if self._kind() != "message":
                    self._begin(out, _item("message", status="in_progress"))
                self._delta(out, event.text)
            elif isinstance(event, ReasoningDelta):
                if self._kind() != "reasoning":
                    self._begin(out, _item("reasoning", status="in_progress"))
                self._delta(out, event.text)
            elif isinstance(event, ToolCallDelta):
                index = event.index or 0
                if self._kind() != "function_call" or index != self._tool_index:
                    item = _item("function_call", call_id=event.id or _id("call"))
                    item.update(self._tools.call_fields(event.name or ""))
                    item["status"] = "in_progress"
                    self._begin(out, item)
                    self._tool_index = index
                if event.arguments:
                    self._delta(out, event.arguments)
            elif isinstance(event, Finish):
                self._finish = event
            elif isinstance(event, Usage):
                self._usage = event
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = [] if self._started else self.start()
        length = self._finish is not None and self._finish.reason == "length"
        status: Status = "incomplete" if length else "completed"
        self._close(out, status)
        self._emit(out, f"response.{status}", response=self._response(status, _usage(self._usage)))
        return out

    @property
    def usage(self) -> dict[str, Any]:
        """The latest usage, as OpenAI reports it (for the access log and metrics)."""
        return {} if self._usage is None else openai_usage(self._usage)

    def error(self, status: int, message: str) -> list[Event]:
        """``response.failed`` carrying what was said so far; nothing follows it. The SDK
        yields it as an event and ``get_final_response()`` raises for want of
        ``response.completed``, as against OpenAI itself."""
        out: list[Event] = [] if self._started else self.start()
        if self._open is not None:
            _settle(self._open, "".join(self._text), "incomplete")
            self._open = None
        failure = {"code": error_code(status), "message": message}
        self._emit(
            out, "response.failed", response=self._response("failed", _usage(self._usage), failure)
        )
        return out
