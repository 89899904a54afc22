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
