"""Sessions on disk: one JSON file per session, ``<sessions_dir>/<id>.json``, replaced
atomically (temp file + fsync + os.replace) so a crash mid-write never leaves half a file.

``messages`` is the conversation in OpenAI chat form; keys starting with ``_`` are ours
(reasoning, the ACP prompt blocks, tool display content) and never reach the endpoint.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from helexa.acp.files import replace_atomically

log = logging.getLogger("helexa.acp.store")

FORMAT_VERSION = 1
# uuid4 strings (ours) and anything else safe as a file name; never a path.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_session_id() -> str:
    # Random, not a counter: ids stay unique across restarts and machines.
    return str(uuid.uuid4())


class StoredSession(BaseModel):
    version: int = FORMAT_VERSION
    id: str
    cwd: str
    title: str | None = None
    created_at: str = Field(default_factory=now_iso)
    updated_at: str = Field(default_factory=now_iso)
    mode: str = "default"
    endpoint: str | None = None
    model: str
    # ACP tool kinds ("edit", "execute") the user chose "allow always" for.
    always_allowed: list[str] = Field(default_factory=list)
    messages: list[dict[str, Any]] = Field(default_factory=list)


class SessionStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        # Writes run in worker threads: one at a time, and never an older snapshot over a
        # newer one (a cancelled save's thread can finish after the next save's).
        self._lock = threading.Lock()
        self._written: dict[str, int] = {}

    def path_for(self, session_id: str) -> Path:
        if not _SAFE_ID.match(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return self.root / f"{session_id}.json"

    def save(self, session: StoredSession) -> None:
        self.write(session.id, snapshot(session))

    def write(self, session_id: str, data: str, seq: int | None = None) -> bool:
        """Write a ``snapshot``; with ``seq``, only when no later-numbered one of this session
        is on disk already. Whether it was written."""
        with self._lock:
            if seq is not None and seq < self._written.get(session_id, 0):
                return False
            path = self.path_for(session_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, data.encode(), new_mode=0o600)  # a private conversation
            if seq is not None:
                self._written[session_id] = seq
            return True

    def load(self, session_id: str) -> StoredSession | None:
        try:
            path = self.path_for(session_id)
            text = path.read_text(encoding="utf-8")
        except (ValueError, OSError):
            return None
        try:
            return StoredSession.model_validate_json(text)
        except ValidationError as exc:
            log.warning("unreadable session file", extra={"path": str(path), "err": str(exc)})
            return None

    def all(self) -> list[StoredSession]:
        """Every readable session, most recently updated first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.glob("*.json"):
            session = self.load(path.stem)
            if session is not None:
                found.append(session)
        found.sort(key=lambda s: s.updated_at, reverse=True)
        return found


def snapshot(session: StoredSession) -> str:
    """The session file's text; take it on the event loop, where the session changes."""
    return session.model_dump_json(indent=1)


def same_dir(a: str, b: str) -> bool:
    """Whether two cwd strings name the same directory (trailing slashes, ``..``, ``~``)."""
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))


def title_from(text: str, limit: int = 60) -> str | None:
    """A session title: the first non-empty line of the first prompt, shortened."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"
    return None
