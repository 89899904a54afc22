"""What one round sends the model: the system prompt, the stored history in wire form, and
the trimming that keeps it under the context window (pure functions).

Tokens are estimated as characters / 4: no tokenizer is at hand for an arbitrary endpoint,
and trimming only needs to be roughly right and on the safe side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helexa.acp.policy import plans_dir

ELIDED = "[tool output removed to fit the context window; run the tool again if needed]"
MIN_REPLY_TOKENS = 256


def estimate_tokens(value: Any) -> int:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return len(text) // 4 + 1


def system_prompt(cwd: str, mode: str) -> str:
    lines = [
        "You are helexa, a coding agent working in the user's project through their editor.",
        f"The project root (working directory) is {cwd}. Relative paths are resolved against it.",
        "Use the tools to look before you change anything: list_dir, read_file and grep to "
        "explore; edit_file for small changes (its `old` text must match exactly once); "
        "write_file to create or replace whole files; bash to run commands.",
        "Keep answers short and concrete. When the task is done, say what you changed.",
    ]
    if mode == "plan":
        plans = plans_dir(Path(cwd))
        lines.append(
            "PLAN MODE: investigate but do not change the project and do not run commands. "
            f"Write your plan as a Markdown file under {plans}/ and summarise it."
        )
    elif mode == "default":
        lines.append(
            "Writes and commands ask the user for permission first. If the user denies one, "
            "do not retry it unchanged: adapt or ask."
        )
    return "\n".join(lines)


# On a failed tool message in wire form, for the wire APIs that can say so (Anthropic's
# ``is_error``); the OpenAI wire drops it.
IS_ERROR = "is_error"


def wire_messages(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored history as the endpoint gets it: our ``_`` keys dropped (a failed tool
    result marked ``is_error``), messages that were only shown to the user (``_local``) and
    empty assistant turns left out."""
    out: list[dict[str, Any]] = []
    for message in history:
        if message.get("_local"):
            continue
        clean = {k: v for k, v in message.items() if not k.startswith("_")}
        if clean.get("role") == "tool" and message.get("_status") == "failed":
            clean[IS_ERROR] = True
        if clean.get("role") == "assistant":
            if not clean.get("tool_calls"):
                clean.pop("tool_calls", None)
                if not clean.get("content"):
                    continue
            elif not clean.get("content"):
                clean["content"] = None
        out.append(clean)
    return out


def _groups(messages: list[dict[str, Any]]) -> list[list[int]]:
    """Indices grouped so that an assistant turn travels with its tool results."""
    groups: list[list[int]] = []
    for index, message in enumerate(messages):
        if message.get("role") == "tool" and groups:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def fit_to_window(messages: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """``messages`` trimmed to about ``budget`` tokens: first the oldest tool outputs are
    elided, then the oldest groups dropped; the latest user message and the newest group
    always stay (pure: returns new lists and dicts)."""
    sizes = [estimate_tokens(m) for m in messages]
    total = sum(sizes)
    if total <= budget:
        return list(messages)
    out = [dict(m) for m in messages]
    for index, message in enumerate(out):
        if total <= budget:
            return out
        if message.get("role") == "tool" and message.get("content") != ELIDED:
            message["content"] = ELIDED
            new_size = estimate_tokens(message)
            total += new_size - sizes[index]
            sizes[index] = new_size
    if total <= budget:
        return out
    last_user = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=-1)
    groups = _groups(out)
    keep = [True] * len(groups)
    for position, group in enumerate(groups[:-1]):
        if total <= budget:
            break
        if last_user in group:
            continue
        keep[position] = False
        total -= sum(sizes[i] for i in group)
    kept = [out[i] for position, group in enumerate(groups) if keep[position] for i in group]
    # Chat templates want the conversation to open with the user: drop leading leftovers.
    first_user = next((i for i, m in enumerate(kept) if m.get("role") == "user"), 0)
    return kept[first_user:]


def request_messages(
    history: list[dict[str, Any]],
    cwd: str,
    mode: str,
    tools: list[dict[str, Any]],
    context_window: int,
    max_tokens: int,
) -> tuple[list[dict[str, Any]], int]:
    """(messages to send, max_tokens to ask for) for one round."""
    system = {"role": "system", "content": system_prompt(cwd, mode)}
    reserve = max(MIN_REPLY_TOKENS, min(max_tokens, context_window // 2))
    budget = context_window - reserve - estimate_tokens(system) - estimate_tokens(tools)
    fitted = fit_to_window(wire_messages(history), max(budget, 0))
    used = estimate_tokens(system) + estimate_tokens(tools) + sum(map(estimate_tokens, fitted))
    reply = max(MIN_REPLY_TOKENS, min(max_tokens, context_window - used))
    return [system, *fitted], reply
