"""``list_dir`` and ``grep`` on the local disk: ACP has no client method for either."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from helexa.acp.workspace import ToolError

# Folders nobody means to search: VCS internals, environments, caches.
SKIP_DIRS = frozenset(
    {".git", ".hg", ".svn", "node_modules", ".venv", "venv", "__pycache__", ".mypy_cache",
     ".ruff_cache", ".pytest_cache", ".tox", ".cache"}
)  # fmt: skip
MAX_FILE_BYTES = 2 * 1024 * 1024


def list_dir(path: Path, limit: int = 1000) -> str:
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except FileNotFoundError as exc:
        raise ToolError(f"{path}: no such directory") from exc
    except NotADirectoryError as exc:
        raise ToolError(f"{path} is a file; use read_file") from exc
    except OSError as exc:
        raise ToolError(f"cannot list {path}: {exc.strerror or exc}") from exc
    names = []
    for entry in entries[:limit]:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        names.append(entry.name + ("/" if is_dir else ""))
    if len(entries) > limit:
        names.append(f"… and {len(entries) - limit} more entries")
    return "\n".join(names) if names else "(empty directory)"


def walk_files(root: Path) -> Iterator[Path]:
    """``root`` itself when a file, else the files under it, in a stable order."""
    if root.is_file():
        yield root
        return
    for base, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            yield Path(base) / name


def grep(
    pattern: str,
    root: Path,
    cwd: Path,
    *,
    max_matches: int = 200,
    max_line: int = 300,
    time_budget_s: float = 20.0,
) -> str:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ToolError(f"bad regular expression {pattern!r}: {exc}") from exc
    if not root.exists():
        raise ToolError(f"{root}: no such file or directory")
    deadline = time.monotonic() + time_budget_s
    matches: list[str] = []
    stopped = ""

    for path in walk_files(root):
        if time.monotonic() > deadline:
            stopped = f"(stopped after {time_budget_s:.0f}s; narrow the path)"
            break
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue  # binary
        shown = _shown(path, cwd)
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if regex.search(line):
                text = line if len(line) <= max_line else line[:max_line] + "…"
                matches.append(f"{shown}:{number}:{text}")
                if len(matches) >= max_matches:
                    stopped = f"(first {max_matches} matches shown; narrow the search)"
                    break
        if len(matches) >= max_matches:
            break
    if not matches:
        return "No matches."
    return "\n".join(matches + ([stopped] if stopped else []))


def _shown(path: Path, cwd: Path) -> str:
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)
