"""Local text files for the tools, read and written defensively.

Reads run without permission in every mode, so a path the model picks must not be able to
exhaust memory (``/dev/zero``), block forever (a FIFO, ``/dev/stdin``) or read the protocol
stream (``/proc/self/fd/0``): only regular files are opened, and never more than a capped
number of bytes is read. Writes go to a temp file beside the target, then ``os.replace``,
so a crash or a full disk never leaves half a file. Bytes in and out: line endings (CRLF)
stay exactly as they are.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO

from helexa.acp.errors import ToolError

MAX_READ_BYTES = 4 * 1024 * 1024  # a whole read_file, or the lines kept of a range
SCAN_FACTOR = 64  # a range read skips at most this many times MAX_READ_BYTES to its start
BINARY_PROBE = 8192  # a NUL in the first this many bytes: a binary file
_CHUNK = 64 * 1024
_MB = 1024 * 1024


def check_regular(path: Path) -> os.stat_result:
    """``path``'s stat (symlinks followed) if it is a regular file; ToolError otherwise."""
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise ToolError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ToolError(f"{path} is a directory; use list_dir")
    if not stat.S_ISREG(info.st_mode):
        raise ToolError(f"{path} is not a regular file (a device, FIFO or socket); not read")
    return info


def open_regular(path: Path) -> BinaryIO:
    """``path`` open for reading if it is a regular file; ToolError otherwise.

    Checked before opening (opening a FIFO blocks, opening a device may act) and again on
    the open file, non-blocking, in case it was swapped for something else in between."""
    check_regular(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ToolError(f"{path} is not a regular file (a device, FIFO or socket); not read")
    return os.fdopen(fd, "rb")


def looks_binary(head: bytes) -> bool:
    return b"\0" in head[:BINARY_PROBE]


def read_text_file(
    path: Path,
    line: int | None = None,
    limit: int | None = None,
    *,
    max_bytes: int = MAX_READ_BYTES,
) -> str:
    """The UTF-8 text of ``path``, or lines ``line`` (1-based) .. ``line + limit - 1`` of
    it, newlines kept. Whole files over ``max_bytes`` and binary files are ToolErrors; a
    range is streamed, so only the lines kept are held."""
    with open_regular(path) as handle:
        try:
            if looks_binary(handle.read(BINARY_PROBE)):
                raise ToolError(f"{path} looks like a binary file (it has NUL bytes); not read")
            handle.seek(0)
            if line is None and limit is None:
                return _decode(_read_whole(handle, path, max_bytes), path)
            return _read_range(handle, path, (line or 1) - 1, limit, max_bytes)
        except OSError as exc:
            raise ToolError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_whole(handle: BinaryIO, path: Path, max_bytes: int) -> bytes:
    data = handle.read(max_bytes + 1)  # st_size can lie (/proc): never trust it for the cap
    if len(data) > max_bytes:
        raise ToolError(
            f"{path} is over {_size(max_bytes)}, too large to take whole; "
            "read_file can read part of it with line and limit"
        )
    return data


def _read_range(handle: BinaryIO, path: Path, start: int, limit: int | None, max_bytes: int) -> str:
    kept: list[bytes] = []
    kept_bytes = scanned = index = 0
    while limit is None or index < start + limit:
        piece = handle.readline(_CHUNK)  # bounded: a file with no newlines is read in chunks
        if not piece:
            break
        scanned += len(piece)
        if index >= start:
            kept.append(piece)
            kept_bytes += len(piece)
            if kept_bytes > max_bytes:
                note = f"\n[stopped after {max_bytes} bytes; read a smaller range]"
                return _decode(b"".join(kept)[:max_bytes], path, final=False) + note
        elif scanned > max_bytes * SCAN_FACTOR:
            raise ToolError(
                f"line {start + 1} of {path} lies beyond its first "
                f"{_size(max_bytes * SCAN_FACTOR)}; use grep or bash to look there"
            )
        if piece.endswith(b"\n"):
            index += 1
    return _decode(b"".join(kept), path)


def _size(n: int) -> str:
    return f"{n // _MB} MB" if n >= _MB else f"{n} bytes"


def _decode(data: bytes, path: Path, *, final: bool = True) -> str:
    """Strict UTF-8; ``final=False`` drops a character cut in half at the end."""
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError as exc:
        raise ToolError(f"{path} is not a UTF-8 text file") from exc


def write_text_file(path: Path, content: str) -> None:
    """Replace ``path``'s content atomically. A symlink is written through (its target is
    replaced, the link stays), and an existing file keeps its permission bits."""
    target = Path(os.path.realpath(path))
    data = content.encode("utf-8")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(target, data)
    except OSError as exc:
        raise ToolError(f"cannot write {path}: {exc.strerror or exc}") from exc


def replace_atomically(target: Path, data: bytes, new_mode: int = 0o666) -> None:
    """Write ``data`` to a temp file beside ``target``, fsync it, rename it over: a crash
    or a full disk leaves the old file or the new one, never half of either. A file that
    exists keeps its permission bits; a new one gets ``new_mode`` (less the umask)."""
    try:
        mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = None
    # Short enough for NAME_MAX; a dot file so that watchers and globs mostly ignore it.
    tmp = target.parent / f".{target.name[:200]}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, new_mode)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
