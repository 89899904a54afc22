"""Weight files checked before any library reads them: an empty, truncated or foreign file is
the operator's to fix, so a 422 ``model_weights_invalid`` naming the file and what is wrong,
never a 500 with a library's traceback text (or a ``MemoryError`` from a garbage header
length)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from helexa.core.errors import ApiError

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)


def invalid_weights(path: Path, reason: str) -> ApiError:
    return ApiError(
        422,
        f"the weights file {path.name} cannot be used: {reason}",
        code="model_weights_invalid",
        param="model_id",
    )


def check_safetensors(path: Path) -> dict[str, Any]:
    """The file's header, once it is known to describe a file of this size."""
    size = path.stat().st_size
    if size < 8:
        raise invalid_weights(path, f"it is empty or truncated ({size} bytes)")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > SAFETENSORS_MAX_HEADER or 8 + header_len > size:
            raise invalid_weights(
                path, f"not a safetensors file (a header of {header_len} bytes in {size})"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (ValueError, UnicodeDecodeError):
            raise invalid_weights(path, "not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise invalid_weights(path, "not a safetensors file (unreadable header)")
    try:
        end = max(
            (
                int(meta["data_offsets"][1])
                for name, meta in header.items()
                if name != "__metadata__"
            ),
            default=0,
        )
    except (KeyError, IndexError, TypeError, ValueError):
        raise invalid_weights(path, "not a safetensors file (malformed tensor entries)") from None
    if 8 + header_len + end > size:
        raise invalid_weights(
            path, f"it is truncated ({size} bytes; its header describes {8 + header_len + end})"
        )
    return header


def check_gguf(path: Path) -> None:
    size = path.stat().st_size
    if size < 24:  # magic, version, tensor and metadata counts
        raise invalid_weights(path, f"it is empty or truncated ({size} bytes)")
    with path.open("rb") as handle:
        magic, version = struct.unpack("<4sI", handle.read(8))
    if magic != GGUF_MAGIC:
        raise invalid_weights(path, "not a GGUF file")
    if version not in GGUF_VERSIONS:
        raise invalid_weights(path, f"GGUF version {version} is not supported")


def unreadable_gguf(path: Path, exc: BaseException) -> ApiError:
    """The GGUF reader failed past a good header: corrupt metadata or missing tensor data."""
    return invalid_weights(path, f"it is truncated or corrupt ({type(exc).__name__}: {exc})")


# What the GGUF reader raises on a damaged file (numpy reshapes, struct unpacks, lookups).
GGUF_READ_ERRORS = (ValueError, struct.error, IndexError, KeyError, OverflowError, EOFError)
