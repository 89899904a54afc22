"""Session modes and the permission decision for each tool call (pure functions).

- ``default``: reads are free; writes and commands ask the user (``allow_always`` remembers
  the tool kind, "edit" or "execute", for the rest of the session).
- ``bypass``: everything is allowed without asking.
- ``plan``: no commands; writes only under ``<cwd>/.helexa/plans/`` (allowed without asking:
  that folder is the plan's scratch space, not the project).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

PLANS_DIR = Path(".helexa") / "plans"

ToolClass = Literal["read", "write", "command"]


@dataclass(frozen=True)
class ModeInfo:
    id: str
    name: str
    description: str


MODES: tuple[ModeInfo, ...] = (
    ModeInfo("default", "Default", "Ask before writing files or running commands"),
    ModeInfo("bypass", "Bypass permissions", "Write files and run commands without asking"),
    ModeInfo("plan", "Plan", "Read-only: no commands; writes only to .helexa/plans/"),
)
MODE_IDS = tuple(m.id for m in MODES)

# Option ids and kinds exactly as ACP clients (and our tests) expect them.
ALLOW_ONCE = "allow_once"
ALLOW_ALWAYS = "allow_always"
REJECT_ONCE = "reject_once"


class Verdict(Enum):
    ALLOW = "allow"
    ASK = "ask"
    DENY = "deny"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""


def plans_dir(cwd: Path) -> Path:
    return cwd / PLANS_DIR


def is_within(path: Path, root: Path) -> bool:
    """Whether ``path`` lies under ``root`` once ``..`` and symlinks are resolved."""
    real_path = Path(os.path.realpath(path))
    real_root = Path(os.path.realpath(root))
    return real_path == real_root or real_root in real_path.parents


def in_plans_dir(target: Path, cwd: Path) -> bool:
    """Whether a write to ``target`` stays inside ``<cwd>/.helexa/plans``. The folder must
    be a real folder: a repository can ship ``.helexa/plans -> /`` (or ``.helexa -> ..``),
    and resolving through that would let plan mode write anywhere."""
    expected = Path(os.path.realpath(cwd)) / PLANS_DIR
    if Path(os.path.realpath(plans_dir(cwd))) != expected:
        return False  # a symlink on the way from the project to the plans folder
    return is_within(target, expected)


def acp_kind_for(tool_class: ToolClass) -> str:
    return {"read": "read", "write": "edit", "command": "execute"}[tool_class]


def decide(
    mode: str,
    tool_class: ToolClass,
    target: Path | None,
    cwd: Path,
    always_allowed: frozenset[str] | set[str],
) -> Decision:
    """May this call run now, must the user be asked, or is it refused (with why)?"""
    if tool_class == "read" or mode == "bypass":
        return Decision(Verdict.ALLOW)
    if mode == "plan":
        if tool_class == "command":
            return Decision(Verdict.DENY, "plan mode: running commands is not allowed")
        plans = plans_dir(cwd)
        if target is not None and in_plans_dir(target, cwd):
            return Decision(Verdict.ALLOW)
        return Decision(
            Verdict.DENY,
            f"plan mode: files may only be written under {plans}/ (switch mode to change files)",
        )
    if acp_kind_for(tool_class) in always_allowed:
        return Decision(Verdict.ALLOW)
    return Decision(Verdict.ASK)


def remembered_after(option_id: str, tool_class: ToolClass, always: set[str]) -> set[str]:
    """The session's always-allowed kinds after the user picked ``option_id``."""
    if option_id == ALLOW_ALWAYS:
        return always | {acp_kind_for(tool_class)}
    return set(always)


def is_allowed(option_id: str | None) -> bool:
    return option_id in (ALLOW_ONCE, ALLOW_ALWAYS)
