"""The tools the model may call: their OpenAI function schemas, argument models, and how a
call is shown to the user (title, ACP kind, locations). Execution lives in ``toolrun``.

Names and argument names are a contract with the model and the tests: keep them exact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helexa.acp.policy import ToolClass


class _Args(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ReadFileArgs(_Args):
    path: str = Field(min_length=1)
    line: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)


class ListDirArgs(_Args):
    path: str = "."


class WriteFileArgs(_Args):
    path: str = Field(min_length=1)
    content: str


class EditFileArgs(_Args):
    path: str = Field(min_length=1)
    old: str = Field(min_length=1)
    new: str


class BashArgs(_Args):
    command: str = Field(min_length=1)
    cwd: str | None = None


class GrepArgs(_Args):
    pattern: str = Field(min_length=1)
    path: str | None = None


@dataclass(frozen=True)
class ToolSpec:
    name: str
    args: type[_Args]
    tool_class: ToolClass
    kind: str  # ACP ToolKind
    description: str
    parameters: dict[str, Any]


def _params(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


_S = {"type": "string"}
_I = {"type": "integer", "minimum": 1}

TOOLS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec(
            "read_file",
            ReadFileArgs,
            "read",
            "read",
            "Read a text file. Optional `line` (1-based) and `limit` (number of lines) read "
            "part of a large file.",
            _params(
                {
                    "path": {**_S, "description": "File path, absolute or relative to the project"},
                    "line": {**_I, "description": "First line to read (1-based)"},
                    "limit": {**_I, "description": "Maximum number of lines"},
                },
                ["path"],
            ),
        ),
        ToolSpec(
            "list_dir",
            ListDirArgs,
            "read",
            "read",
            "List a directory's entries (directories end with '/').",
            _params({"path": {**_S, "description": "Directory path"}}, ["path"]),
        ),
        ToolSpec(
            "write_file",
            WriteFileArgs,
            "write",
            "edit",
            "Create or overwrite a file with `content`.",
            _params(
                {"path": {**_S, "description": "File path"}, "content": _S}, ["path", "content"]
            ),
        ),
        ToolSpec(
            "edit_file",
            EditFileArgs,
            "write",
            "edit",
            "Replace the text `old` with `new` in a file. `old` must occur exactly once: "
            "include enough surrounding lines to make it unique.",
            _params(
                {
                    "path": {**_S, "description": "File path"},
                    "old": {**_S, "description": "Exact text to replace (must be unique)"},
                    "new": {**_S, "description": "Replacement text"},
                },
                ["path", "old", "new"],
            ),
        ),
        ToolSpec(
            "bash",
            BashArgs,
            "command",
            "execute",
            "Run a shell command (bash -c) and return its combined output and exit code.",
            _params(
                {
                    "command": {**_S, "description": "The command line"},
                    "cwd": {**_S, "description": "Working directory (default: the project)"},
                },
                ["command"],
            ),
        ),
        ToolSpec(
            "grep",
            GrepArgs,
            "read",
            "search",
            "Search file contents with a regular expression (Python syntax); prints "
            "path:line:text for each match.",
            _params(
                {
                    "pattern": {**_S, "description": "Regular expression"},
                    "path": {**_S, "description": "File or directory (default: the project)"},
                },
                ["pattern"],
            ),
        ),
    )
}


def openai_tools() -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": s.name, "description": s.description, "parameters": s.parameters},
        }
        for s in TOOLS.values()
    ]


class ToolArgError(ValueError):
    """The model's arguments do not fit the tool; the message goes back to the model."""


def parse_args(name: str, arguments: str) -> _Args:
    spec = TOOLS.get(name)
    if spec is None:
        raise ToolArgError(f"unknown tool {name!r}; available: {', '.join(TOOLS)}")
    try:
        raw = json.loads(arguments) if arguments.strip() else {}
    except ValueError as exc:
        raise ToolArgError(f"arguments are not valid JSON: {exc}") from exc
    except RecursionError as exc:  # "[[[[…": the JSON parser recurses per level
        raise ToolArgError("arguments are nested too deeply") from exc
    if not isinstance(raw, dict):
        raise ToolArgError("arguments must be a JSON object")
    try:
        return spec.args.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors()
        )
        raise ToolArgError(f"bad arguments for {name}: {problems}") from exc


def resolve_path(cwd: Path, raw: str) -> Path:
    """``raw`` against the session cwd: ``~`` expands, ``..`` folds (pure: no disk access)."""
    path = Path(os.path.expanduser(raw))
    if not path.is_absolute():
        path = cwd / path
    return Path(os.path.normpath(path))


def shown_path(cwd: Path, path: Path) -> str:
    """A path as the user reads it in a title: relative inside the project."""
    try:
        rel = path.relative_to(cwd)
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else "."


def short(text: str, limit: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True)
class CallView:
    title: str
    kind: str
    locations: list[tuple[str, int | None]] = field(default_factory=list)
    target: Path | None = None  # the file written, for the permission decision


def describe(name: str, args: _Args, cwd: Path) -> CallView:
    """Title, ACP kind and locations for a parsed call (pure)."""
    kind = TOOLS[name].kind
    if isinstance(args, ReadFileArgs):
        path = resolve_path(cwd, args.path)
        where = f" (from line {args.line})" if args.line else ""
        return CallView(f"Read {shown_path(cwd, path)}{where}", kind, [(str(path), args.line)])
    if isinstance(args, ListDirArgs):
        path = resolve_path(cwd, args.path)
        return CallView(f"List {shown_path(cwd, path)}", kind, [(str(path), None)])
    if isinstance(args, WriteFileArgs | EditFileArgs):
        path = resolve_path(cwd, args.path)
        verb = "Write" if isinstance(args, WriteFileArgs) else "Edit"
        return CallView(f"{verb} {shown_path(cwd, path)}", kind, [(str(path), None)], path)
    if isinstance(args, BashArgs):
        where = f" (in {args.cwd})" if args.cwd else ""
        return CallView(f"Run `{short(args.command)}`{where}", kind)
    if isinstance(args, GrepArgs):
        path = resolve_path(cwd, args.path or ".")
        title = f"Grep `{short(args.pattern, 60)}` in {shown_path(cwd, path)}"
        return CallView(title, kind, [(str(path), None)])
    return CallView(name, kind)


def fallback_view(name: str) -> CallView:
    """How to show a call whose arguments did not parse."""
    spec = TOOLS.get(name)
    return CallView(name or "tool", spec.kind if spec else "other")
