"""The transformers engine's KV cache: fixed-size blocks of positions, allocated at load.

Every layer's keys and values live in one preallocated tensor of ``blocks * block_size`` cells;
a sequence (a slot of the engine) holds a table of block ids. Blocks are reference-counted so
a prefix is shared between slots without copying (``share``); a slot about to write into a
block it shares copies that one block first (copy on write). Capacity is fixed at load, so
memory never grows mid-stream: a step that needs more blocks than are free is refused and the
engine makes room (retained prefixes first, then preemption).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class KvShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.layers * self.kv_heads * self.head_dim * element


def kv_bytes_per_token(config: dict[str, Any], dtype: torch.dtype) -> int:
    """K and V bytes per position of every layer, from a config.json (0 if it cannot say)."""
    text = config.get("text_config") or config
    layers = text.get("num_hidden_layers")
    heads = text.get("num_attention_heads")
    if not isinstance(layers, int) or not isinstance(heads, int) or not heads:
        return 0
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or int(text.get("hidden_size", 0)) // heads
    shape = KvShape(layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    return shape.bytes_per_token()


def blocks_for(positions: int, block_size: int) -> int:
    return -(-positions // block_size)


def blocks_needed(
    table_len: int, start: int, end: int, block_size: int, first_block_shared: bool
) -> int:
    """New blocks a slot holding ``table_len`` blocks needs to write positions
    ``start..end``: the blocks past its table, plus a private copy of the block it writes
    first when that one is shared."""
    grow = max(blocks_for(end, block_size) - table_len, 0)
    return grow + (1 if first_block_shared and start // block_size < table_len else 0)


def cells(table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Cell indices (into the flat ``blocks * block_size`` store) of positions start..end."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def contiguous_start(table: Sequence[int], length: int, block_size: int) -> int | None:
    """The first cell when positions 0..length lie in consecutive cells (a slice then
    replaces a gather); None otherwise."""
    used = blocks_for(length, block_size)
    if used == 0:
        return None
    first = table[0]
    if any(table[i] != first + i for i in range(1, used)):
        return None
    return first * block_size


class PagedKv:
    """The store and its block tables; touched only on the device worker."""

    def __init__(
        self, shape: KvShape, *, blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.shape = shape
        self.block_size = block_size
        self.blocks = blocks
        # One block more than handed out: its first cell pads decode groups (masked reads
        # must not touch a freed request's cells, which may hold NaN).
        size = (shape.kv_heads, (blocks + 1) * block_size, shape.head_dim)
        self.scratch_cell = blocks * block_size
        self.keys = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)
        ]
        self.values = [
            torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)
        ]
        self._refs = [0] * blocks
        self._free = list(range(blocks))  # a heap: low ids first keeps sequences contiguous
        self.tables: dict[int, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def bytes(self) -> int:
        return (self.blocks + 1) * self.block_size * self.shape.bytes_per_token()  # + scratch

    def free_tokens(self) -> int:
        return len(self._free) * self.block_size

    def table(self, slot: int) -> list[int]:
        return self.tables.setdefault(slot, [])

    def _take(self) -> int:
        block = heapq.heappop(self._free)
        self._refs[block] = 1
        return block

    def _drop(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            heapq.heappush(self._free, block)

    def forget(self, slot: int, start: int = 0) -> None:
        table = self.table(slot)
        keep = blocks_for(start, self.block_size)
        for block in table[keep:]:
            self._drop(block)
        del table[keep:]

    def share(self, src: int, dst: int, length: int) -> None:
        shared = self.table(src)[: blocks_for(length, self.block_size)]
        for block in shared:
            self._refs[block] += 1
        self.forget(dst)
        self.tables[dst] = list(shared)

    def clear(self) -> None:
        self.tables.clear()
        self._refs = [0] * self.blocks
        self._free = list(range(self.blocks))

    def needed(self, slot: int, start: int, end: int) -> int:
        table = self.table(slot)
        index = start // self.block_size
        shared = index < len(table) and self._refs[table[index]] > 1
        return blocks_needed(len(table), start, end, self.block_size, shared)

    def fits(self, spans: Sequence[tuple[int, int, int]]) -> bool:
        """Whether (slot, start, end) writes all fit in the free blocks."""
        return sum(self.needed(*span) for span in spans) <= len(self._free)

    def reserve(self, slot: int, start: int, end: int) -> list[int]:
        """Make positions start..end of the slot writable (copy on write, new blocks) and
        return their cells. Call ``fits`` first."""
        table = self.table(slot)
        index = start // self.block_size
        if index < len(table) and self._refs[table[index]] > 1:
            old, new = table[index], self._take()
            span = slice(old * self.block_size, (old + 1) * self.block_size)
            into = slice(new * self.block_size, (new + 1) * self.block_size)
            for store in (self.keys, self.values):
                for layer in store:
                    layer[:, into] = layer[:, span]
            self._drop(old)
            table[index] = new
        while len(table) < blocks_for(end, self.block_size):
            table.append(self._take())
        return cells(table, start, end, self.block_size)
