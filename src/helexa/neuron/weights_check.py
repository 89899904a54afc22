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
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise invalid_weights(path, "not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise invalid_weights(path, "not a safetensors file (unreadable header)")
    tensors = [(n, m) for n, m in header.items() if n != "__metadata__"]
    bad = next((n for n, m in tensors if not _tensor_entry(m)), None)
    if bad is not None:
        raise invalid_weights(path, f"not a safetensors file (a malformed entry for {bad!r})")
    end = max((m["data_offsets"][1] for _n, m in tensors), default=0)
    if 8 + header_len + end > size:
        raise invalid_weights(
            path, f"it is truncated ({size} bytes; its header describes {8 + header_len + end})"
        )
    return header


def _counts(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _tensor_entry(meta: Any) -> bool:
    """``{"dtype": str, "shape": [n, ...], "data_offsets": [begin, end]}``, all counts whole
    and non-negative, the offsets in order."""
    return (
        isinstance(meta, dict)
        and isinstance(meta.get("dtype"), str)
        and _counts(meta.get("shape"))
        and _counts(meta.get("data_offsets"), 2)
        and meta["data_offsets"][0] <= meta["data_offsets"][1]
    )


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
