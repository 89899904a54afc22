"""``list_dir`` and ``grep`` on the local disk: ACP has no client method for either."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from helexa.acp.errors import ToolError
from helexa.acp.files import looks_binary, open_regular

# Folders nobody means to search: VCS internals, environments, caches.
SKIP_DIRS = frozenset(
    {".git", ".hg", ".svn", "node_modules", ".venv", "venv", "__pycache__", ".mypy_cache",
     ".ruff_cache", ".pytest_cache", ".tox", ".cache"}
)  # fmt: skip
MAX_FILE_BYTES = 2 * 1024 * 1024  # larger files are skipped: logs and data, not source
DEADLINE_EVERY = 1000  # lines between checks of the time budget within one file


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
    regex = _compile(pattern)
    if not root.exists():
        raise ToolError(f"{root}: no such file or directory")
    deadline = time.monotonic() + time_budget_s
    matches: list[str] = []
    for path in walk_files(root):
        if len(matches) >= max_matches or time.monotonic() > deadline:
            break
        data = searchable_bytes(path)
        if data is not None:
            shown = _shown(path, cwd)
            _search(regex, data, shown, matches, max_matches, max_line, deadline)
    if len(matches) >= max_matches:
        matches.append(f"(first {max_matches} matches shown; narrow the search)")
    elif time.monotonic() > deadline:
        matches.append(f"(stopped after {time_budget_s:.0f}s; narrow the path)")
    return "\n".join(matches) if matches else "No matches."


def _search(
    regex: re.Pattern[str],
    data: bytes,
    shown: str,
    matches: list[str],
    max_matches: int,
    max_line: int,
    deadline: float,
) -> None:
    """Append ``shown:number:line`` for each matching line, up to ``max_matches`` in all,
    giving up at ``deadline`` (checked within the file too: one file can be slow)."""
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if number % DEADLINE_EVERY == 0 and time.monotonic() > deadline:
            return
        if regex.search(line):
            text = line if len(line) <= max_line else line[:max_line] + "…"
            matches.append(f"{shown}:{number}:{text}")
            if len(matches) >= max_matches:
                return


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    # OverflowError: a repeat count too large (a{99999999999}); RecursionError: deep nesting.
    except (re.error, OverflowError, RecursionError) as exc:
        raise ToolError(f"bad regular expression {pattern!r}: {exc}") from exc


def searchable_bytes(path: Path, limit: int = MAX_FILE_BYTES) -> bytes | None:
    """A file's bytes when it is a regular text file of at most ``limit`` bytes, else None
    (skipped: devices, FIFOs and sockets, large files, binary files, unreadable files)."""
    try:
        with open_regular(path) as handle:
            data = handle.read(limit + 1)  # st_size is 0 for /proc files: cap the read itself
    except (ToolError, OSError, ValueError):
        return None
    if len(data) > limit or looks_binary(data):
        return None
    return data


def _shown(path: Path, cwd: Path) -> str:
    try:
        return str(path.relative_to(cwd))
    except ValueError:
        return str(path)
