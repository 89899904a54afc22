"""Logging to a file, one logfmt line per event: stdout is the protocol stream, and an editor
rarely shows stderr."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from helexa.core.logs import LogfmtFormatter


def setup_file_logging(path: Path, level: str = "info") -> Path | None:
    """Send every log record to ``path`` (created with its folder); None when it cannot be
    opened, in which case records go to stderr rather than nowhere."""
    root = logging.getLogger()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
        opened: Path | None = path
    except OSError:
        handler, opened = logging.StreamHandler(sys.stderr), None
    handler.setFormatter(LogfmtFormatter(strip_ansi=True))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return opened
