"""The conversation history: user prompts in, ``session/update`` replay out (pure).

A user message keeps the ACP prompt blocks (``_prompt``) so a reload shows what was typed;
an assistant message keeps its reasoning (``_reasoning``); a tool message keeps its final
status and display content (``_status``, ``_content``). Tool-call titles, kinds and
locations are recomputed from the call itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from acp import (
    start_tool_call,
    update_agent_message_text,
    update_agent_thought_text,
    update_tool_call,
    update_user_message,
    update_user_message_text,
)
from acp.schema import (
    AgentMessageChunk,
    AgentThoughtChunk,
    ToolCallProgress,
    ToolCallStart,
    UserMessageChunk,
)
from pydantic import TypeAdapter, ValidationError

from helexa.acp.display import Content
from helexa.acp.tools import describe, fallback_view, parse_args
from helexa.acp.ui import locations

Update = UserMessageChunk | AgentMessageChunk | AgentThoughtChunk | ToolCallStart | ToolCallProgress

_BLOCK = TypeAdapter(UserMessageChunk)


def file_path_of(uri: str) -> str:
    """A ``file://`` URI as a path; anything else unchanged."""
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else uri


def render_block(block: dict[str, Any]) -> str:
    """One ACP content block as prompt text for the model."""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "resource_link":
        name = block.get("name") or block.get("uri", "")
        return f"[@{name}]({file_path_of(str(block.get('uri', '')))})"
    if kind == "resource":
        resource = block.get("resource") or {}
        where = file_path_of(str(resource.get("uri", "")))
        if "text" in resource:
            return f'\n<context source="{where}">\n{resource["text"]}\n</context>\n'
        return f"[binary attachment {where} omitted]"
    return f"[{kind} content omitted: this agent reads text only]"


def user_message(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The stored user message for a ``session/prompt`` (blocks in ACP JSON form)."""
    return {"role": "user", "content": "".join(map(render_block, blocks)), "_prompt": blocks}


def prompt_text(blocks: list[dict[str, Any]]) -> str:
    """The typed text only, for a session title."""
    return "".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")


def _user_updates(message: dict[str, Any]) -> list[Update]:
    updates: list[Update] = []
    for block in message.get("_prompt") or []:
        try:
            chunk = _BLOCK.validate_python(
                {"sessionUpdate": "user_message_chunk", "content": block}
            )
        except ValidationError:
            continue
        updates.append(update_user_message(chunk.content))
    if not updates and message.get("content"):
        updates.append(update_user_message_text(str(message["content"])))
    return updates


def _call_updates(call: dict[str, Any], cwd: Path) -> Update:
    function = call.get("function") or {}
    name, arguments = function.get("name", ""), function.get("arguments") or ""
    try:
        args = parse_args(name, arguments)
        view = describe(name, args, cwd)
        raw: Any = args.model_dump(exclude_none=True)
    except Exception:  # whatever the stored arguments are, the session must stay loadable
        view, raw = fallback_view(str(name or "")), str(arguments)
    return start_tool_call(
        call.get("id", ""),
        view.title,
        kind=view.kind,  # type: ignore[arg-type]
        status="pending",
        locations=locations(view) or None,
        raw_input=raw,
    )


def replay(history: list[dict[str, Any]], cwd: str) -> list[Update]:
    """The ``session/update``s that redraw a stored conversation in the editor."""
    root = Path(cwd)
    updates: list[Update] = []
    for message in history:
        role = message.get("role")
        if role == "user":
            updates.extend(_user_updates(message))
        elif role == "assistant":
            if message.get("_reasoning"):
                updates.append(update_agent_thought_text(message["_reasoning"]))
            if message.get("content"):
                updates.append(update_agent_message_text(str(message["content"])))
            updates.extend(_call_updates(c, root) for c in message.get("tool_calls") or [])
        elif role == "tool":
            content: list[Content] | None = message.get("_content")
            updates.append(
                update_tool_call(
                    message.get("tool_call_id", ""),
                    status=message.get("_status", "completed"),
                    content=content,  # type: ignore[arg-type]
                )
            )
    return updates
