"""Where the test set-up put the coding-agent CLIs (scripts/clients.pin, installed by
scripts/dev.sh), and how a test finds one or says why it skips.

``HELEXA_CLIENTS`` points the tests at another install (``scripts/dev.sh clients-latest``
sets it to the newest releases)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PINNED = REPO / ".cache" / "clients" / "pinned"
PACKAGES = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}


def clients_dir() -> Path:
    return Path(os.environ.get("HELEXA_CLIENTS") or PINNED)


def version(command: str) -> str | None:
    """The installed version of ``command``'s npm package, None when not installed."""
    manifest = clients_dir() / "node_modules" / PACKAGES[command] / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def client(command: str) -> Path:
    """The ``command`` CLI (``claude``, ``codex``), or a skip that says why there is none."""
    path = clients_dir() / "node_modules" / ".bin" / command
    if not path.exists():
        reason = (
            f"the {PACKAGES[command]} CLI is not installed at {path} "
            "(scripts/dev.sh test installs it where npm exists)"
        )
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    print(f"{PACKAGES[command]} {version(command)} from {path}")
    return path
