"""Scheduling decisions of the batched engine, as pure functions (no I/O).

A model's KV cache holds ``n`` slots (sequences: llama.cpp sequence ids, or the block tables
of the transformers engine's paged cache). A slot keeps the tokens whose
KV it holds after its request ends, so the next request that starts with them — the next turn
of a conversation, a shared system prompt — evaluates only the rest (prefix reuse). The KV
cache is bounded; when a step finds no room, retained caches go first (least recently used),
then the youngest running sequence is preempted and later recomputed. Where idle caches slow
the running sequences (llama.cpp's unified KV: every decode attends over all cells in use),
they are parked in host memory while others run, and brought back for the request that
continues them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotView:
    """What the decisions need to know of one slot."""

    index: int
    cached: Sequence[int]  # tokens whose KV the slot holds, from position 0
    busy: bool  # a running request owns it
    last_used: int  # tick of the last time a request used it (larger: more recent)
    admitted: int = 0  # busy slots: tick at which their request was admitted


@dataclass(frozen=True)
class ParkedView:
    """A cache parked in host memory, off the KV cache."""

    key: int
    cached: Sequence[int]
    last_used: int


@dataclass(frozen=True)
class SlotChoice:
    slot: int
    reuse: int  # leading tokens of the prompt already in the cache: not evaluated again
    copy_from: int | None = None  # another slot whose first ``reuse`` cells are shared first
    restore: int | None = None  # a parked cache put into the slot first


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence in one decode step."""

    key: int  # the sequence's slot
    count: int  # how many of its pending tokens go in this step


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


def choose_slot(
    tokens: Sequence[int], slots: Sequence[SlotView], parked: Sequence[ParkedView] = ()
) -> SlotChoice | None:
    """The free slot for a request whose context is ``tokens``, and how much it reuses.

    A free slot whose whole cache starts the prompt (the next turn of its conversation) is
    reused in place. Otherwise the free slot that loses least takes it (an empty one, else
    the least recently used), and the longest prefix any slot holds, running or not, is
    shared into it (cells are shared, not copied) — so a second conversation with the same
    system prompt does not wipe the first one's cache. A parked cache that holds more of the
    prompt than any slot is restored into that slot instead. At least the last token is
    always evaluated: its logits give the next token. None when every slot is busy.
    """
    free = [s for s in slots if not s.busy]
    if not free:
        return None
    limit = max(len(tokens) - 1, 0)
    shared = {s.index: min(common_prefix(s.cached, tokens), limit) for s in slots}
    target = min(free, key=lambda s: (len(s.cached) > 0, s.last_used))
    from_parked = {p.key: min(common_prefix(p.cached, tokens), limit) for p in parked}
    best_parked = max(parked, key=lambda p: (from_parked[p.key], p.last_used), default=None)
    if best_parked is not None and from_parked[best_parked.key] > max(shared.values(), default=0):
        return SlotChoice(
            slot=target.index, reuse=from_parked[best_parked.key], restore=best_parked.key
        )
    continued = [s for s in free if shared[s.index] and shared[s.index] in (len(s.cached), limit)]
    if continued:
        best = max(continued, key=lambda s: (shared[s.index], s.last_used))
        return SlotChoice(slot=best.index, reuse=shared[best.index])
    donor = max(
        (s for s in slots if s.index != target.index),
        key=lambda s: shared[s.index],
        default=None,
    )
    if donor is not None and shared[donor.index] > shared[target.index]:
        return SlotChoice(slot=target.index, reuse=shared[donor.index], copy_from=donor.index)
    return SlotChoice(slot=target.index, reuse=shared[target.index])


def plan_step(
    decoding: Sequence[int], prefilling: Sequence[tuple[int, int]], budget: int
) -> list[Chunk]:
    """One decode step: a token for every decoding sequence, then prompt chunks in arrival
    order with what is left of ``budget`` (chunked prefill: a long prompt takes several steps
    while the running streams keep producing)."""
    chunks = [Chunk(key, 1) for key in decoding]
    left = budget - len(chunks)
    for key, pending in prefilling:
        if left <= 0:
            break
        take = min(pending, left)
        chunks.append(Chunk(key, take))
        left -= take
    return chunks


def to_park(slots: Sequence[SlotView]) -> list[int]:
    """Idle slots whose caches go to host memory: all of them while any sequence runs
    (their cells would slow it), none while nothing does."""
    if not any(s.busy for s in slots):
        return []
    return [s.index for s in slots if not s.busy and s.cached]


def plan_parking(
    idle: Sequence[tuple[int, int, int]], parked: Sequence[tuple[int, int, int]], budget: int
) -> tuple[list[int], list[int]]:
    """Which idle slots ``(slot, bytes, last_used)`` to park and which parked caches
    ``(key, bytes, last_used)`` to let go so that host memory holds at most ``budget`` bytes:
    the most recently used first, whichever side they are on. A slot that does not fit stays
    in the KV cache as it is (nothing is copied for it)."""
    items = [(used, size, True, slot) for slot, size, used in idle]
    items += [(used, size, False, key) for key, size, used in parked]
    left = budget
    park: list[int] = []
    drop: list[int] = []
    for _used, size, is_slot, ident in sorted(items, key=lambda item: -item[0]):
        if size <= left:
            left -= size
            if is_slot:
                park.append(ident)
        elif not is_slot:
            drop.append(ident)
    return park, drop


@dataclass(frozen=True)
class MakeRoom:
    """What to give up when the KV cache is full: a retained cache, or a running sequence."""

    slot: int
    preempt: bool  # True: the slot's running request goes back to wait and is recomputed


def make_room(slots: Sequence[SlotView], in_step: frozenset[int]) -> MakeRoom | None:
    """The least valuable cells to free: an idle slot's cache (least recently used first);
    else the most recently admitted running sequence, as long as the step keeps another
    sequence to run. None when nothing can go."""
    idle = [s for s in slots if not s.busy and s.cached]
    if idle:
        return MakeRoom(slot=min(idle, key=lambda s: s.last_used).index, preempt=False)
    running = [s for s in slots if s.busy and in_step - {s.index}]
    if running:
        return MakeRoom(slot=max(running, key=lambda s: s.admitted).index, preempt=True)
    return None
