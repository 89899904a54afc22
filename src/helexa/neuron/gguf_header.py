"""A GGUF file's metadata and the bytes its tensors need, read from the header alone.

``gguf.GGUFReader`` builds every metadata array (a 49 k-token vocabulary, its merges) as
numpy parts: 2.3 s for a 94 MB SmolLM2 GGUF, on every load and size query. Placement needs
a handful of scalars and whether the tensor data is all there; arrays are skipped here
(strings by their lengths, numbers by their size), which takes milliseconds.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STRING, ARRAY = 8, 9
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}  # fmt: skip
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class ArrayField:
    """An array value, not read: its element type and length."""

    type: int
    count: int


@dataclass(frozen=True)
class GgufHeader:
    version: int
    fields: dict[str, Any]  # scalars and strings as values; arrays as ``ArrayField``
    tensors: int
    elements: int  # parameters, every tensor together
    data_end: int  # where the last tensor's data ends: the file must be at least this long


class _Cursor:
    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.at = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buffer, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.at + length > len(self.buffer):
            raise EOFError("a string runs past the end of the file")
        raw = self.buffer[self.at : self.at + length]
        self.at += length
        return raw.decode("utf-8", "replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            self.at += 8 + struct.unpack_from("<Q", self.buffer, self.at)[0]
        if self.at > len(self.buffer):
            raise EOFError("an array runs past the end of the file")

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            element, count = self.unpack("<I"), self.unpack("<Q")
            if element == STRING:
                self.skip_strings(count)
            elif element in SCALARS:
                self.at += count * struct.calcsize(SCALARS[element])
            else:  # nested arrays: read element by element
                for _ in range(count):
                    self.value(element)
            if self.at > len(self.buffer):
                raise EOFError("an array runs past the end of the file")
            return ArrayField(element, count)
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        raise ValueError(f"unknown GGUF value type {kind}")


def read_header(path: Path) -> GgufHeader:
    """The metadata and tensor extent of ``path``. Raises ``ValueError``, ``struct.error``
    or ``EOFError`` on a damaged header (``weights_check.GGUF_READ_ERRORS``)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cursor = _Cursor(buf)
        magic, version = cursor.unpack("<4s"), cursor.unpack("<I")
        if magic != b"GGUF":
            raise ValueError("not a GGUF file")
        tensors, count = cursor.unpack("<Q"), cursor.unpack("<Q")
        fields: dict[str, Any] = {}
        for _ in range(count):
            key = cursor.string()
            fields[key] = cursor.value(cursor.unpack("<I"))
        end = total = 0
        for _ in range(tensors):
            cursor.string()  # name
            dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
            kind, offset = cursor.unpack("<I"), cursor.unpack("<Q")
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            elements = 1
            for dim in dims:
                elements *= dim
            end = max(end, offset + elements // block * size)
            total += elements
        alignment = int(fields.get("general.alignment") or DEFAULT_ALIGNMENT)
        data_start = -(-cursor.at // alignment) * alignment
    return GgufHeader(
        version=version, fields=fields, tensors=tensors, elements=total, data_end=data_start + end
    )
