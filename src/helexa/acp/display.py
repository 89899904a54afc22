"""Tool-call display content, as the ACP JSON it is sent and stored as (pure).

Plain dicts in wire form (camelCase): the session file keeps them for replay and the SDK's
models validate them on the way out.
"""

from __future__ import annotations

import json
from typing import Any

Content = dict[str, Any]

UI_TEXT_LIMIT = 4000  # chars of a tool's output shown in the editor's tool card


def text_content(text: str) -> Content:
    return {"type": "content", "content": {"type": "text", "text": text}}


def diff_content(path: str, old_text: str | None, new_text: str) -> Content:
    diff: Content = {"type": "diff", "path": path, "newText": new_text}
    if old_text is not None:
        diff["oldText"] = old_text
    return diff


STORED_TEXT_LIMIT = 64 * 1024  # chars of each diff text kept in the session file


def for_storage(content: list[Content], limit: int = STORED_TEXT_LIMIT) -> list[Content]:
    """Display content as the session file keeps it: a diff whose old or new text is over
    ``limit`` chars becomes a note, or every edit of a big file would store it twice more."""
    return [_stored(item, limit) for item in content]


def _stored(item: Content, limit: int) -> Content:
    if item.get("type") != "diff":
        return item
    size = max(len(item.get("oldText") or ""), len(item.get("newText") or ""))
    if size <= limit:
        return item
    return text_content(f"Changed {item.get('path')} (diff of {size} characters not kept)")


def terminal_content(terminal_id: str) -> Content:
    return {"type": "terminal", "terminalId": terminal_id}


def fenced(text: str, limit: int = UI_TEXT_LIMIT) -> str:
    """``text`` as a Markdown code block, shortened for display, with a fence it cannot
    close early."""
    if len(text) > limit:
        text = text[:limit] + f"\n… ({len(text) - limit} more characters)"
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text.rstrip()}\n{fence}"


def cap(text: str, limit: int, hint: str = "") -> str:
    """At most ``limit`` chars of a tool result for the model, saying what was cut."""
    if len(text) <= limit:
        return text
    note = f"\n[truncated: {len(text) - limit} more characters{'; ' + hint if hint else ''}]"
    return text[:limit] + note


def error_text(message: str) -> str:
    """A failed tool's result, as the model reads it."""
    return json.dumps({"error": message}, ensure_ascii=False)
