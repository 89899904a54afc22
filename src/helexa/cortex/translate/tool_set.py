"""Which of a client's tools reach the model.

Tools a client sends that no model on this fleet can call: OpenAI's hosted tools
(``web_search``, ``file_search``, ``code_interpreter``, …), Anthropic's server tools
(``web_search_20250305``, …) and Anthropic-defined tools the model knows by type alone.
Codex sends ``web_search`` with every request, Claude Code sends ``web_search_*`` for its
WebSearch tool: refusing them would break the client on its first request, so by default
they are left out of what the model sees and named back to the client (a response header,
the access log). ``[compat] hosted_tools = "reject"`` refuses such a request instead."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from helexa.core.errors import bad_request

HostedTools = Literal["omit", "reject"]

# The response header naming what was left out (comma-separated, as the client typed them).
OMITTED_HEADER = b"x-helexa-omitted-tools"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")
MAX_LABEL = 64


def label(name: object) -> str:
    """A tool's type or name as a header- and log-safe token (the client chose it)."""
    text = name if isinstance(name, str) and name else "unnamed"
    return _UNSAFE.sub("?", text)[:MAX_LABEL]


def leave_out(policy: HostedTools, name: object, where: str, why: str) -> str:
    """The label of a tool left out, or a 400 naming it when the policy is ``reject``."""
    if policy == "reject":
        raise bad_request(f"{where}: {why}", param=where)
    return label(name)


MAX_NAMED = 16  # a header (and a log line) names this many, then counts the rest


def named(omitted: Iterable[str], separator: str = ", ") -> str:
    """Each label once, in the order first seen; past MAX_NAMED, how many more."""
    labels = list(dict.fromkeys(omitted))
    more = len(labels) - MAX_NAMED
    return separator.join(labels[:MAX_NAMED]) + (f"{separator}+{more} more" if more > 0 else "")


def header_value(omitted: Iterable[str]) -> bytes:
    return named(omitted).encode("ascii")


@dataclass(frozen=True)
class ToolSet:
    """What a request's tools become for the model: chat function tools, the tools left
    out (labels), for tools from a ``namespace`` group the name the model sees →
    (namespace, name) as the client declared it (a call is handed back under both), and
    the deferred tools."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    omitted: tuple[str, ...] = ()
    origin: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Tools sent with defer_loading (Anthropic tool search): name → function definition,
    # shown to the model where a tool_reference names them, not in the tool list.
    deferred: dict[str, dict[str, Any]] = field(default_factory=dict)
    withheld: frozenset[str] = frozenset()  # names of the tools left out (tool_choice)

    def visible(self, name: str, namespace: str | None) -> str:
        """The model's name for ``name`` in ``namespace`` (as a replayed call names it)."""
        if namespace:
            for seen, (space, bare) in self.origin.items():
                if space == namespace and bare == name:
                    return seen
        return name

    def call_fields(self, name: str) -> dict[str, str]:
        """``name`` (and ``namespace``) of a function_call item for a call the model made."""
        space, bare = self.origin.get(name, ("", name))
        return {"name": bare, "namespace": space} if space else {"name": name}
