"""Structured logging: one logfmt line per event, extra fields appended as key=value."""

from __future__ import annotations

import logging
import re
import sys
import time

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    # uvicorn's records carry a copy of the message with ANSI colours for its own console
    # formatter: never a field of ours.
    "color_message",
}
# CSI sequences (colours, cursor moves) and the two-byte escapes: what a terminal would eat.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


# Control characters a client can put in a path or a header value: escaped, so one log
# line stays one line and a NUL, CR or terminal escape never reaches the journal or the
# operator's terminal raw. Field values carry no colours of ours: their ANSI sequences are
# dropped, and ESC and the C1 controls are escaped with the rest. The message keeps ESC
# (a library's colours, for a terminal; strip_ansi takes them out of files).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_MESSAGE = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or f"\\x{ord(char):02x}"


def _quote(value: object, *, message: bool = False) -> str:
    """A logfmt value; ``message``: the line's own text, whose colours may stay."""
    text = str(value)
    control = _CONTROL_IN_MESSAGE if message else _CONTROL
    if not message:
        text = strip_ansi(text)
    if text == "" or any(c in text for c in ' "=') or control.search(text):
        text = text.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + control.sub(_escape, text) + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    """``strip_ansi``: drop terminal escapes from the line (journals and files are not TTYs)."""

    def __init__(self, *, strip_ansi: bool = True) -> None:
        super().__init__()
        self.strip_ansi = strip_ansi

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [
            f"ts={stamp}.{int(record.msecs):03d}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage(), message=True)}",
        ]
        parts += [
            f"{k}={_quote(v)}"
            for k, v in record.__dict__.items()
            if k not in _STANDARD and v is not None
        ]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        line = " ".join(parts)
        return strip_ansi(line) if self.strip_ansi else line


def _is_tty(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(strip_ansi=not _is_tty(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
