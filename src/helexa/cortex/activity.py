"""Recent requests, kept in memory for the dashboard: what the access log writes (model,
neuron, status, outcome, time, tokens), with time to first token and decode rate, and
their per-model summary over the last minutes (a pure function)."""

from __future__ import annotations

import collections
import statistics
import time
from collections.abc import Iterable
from typing import Any, NamedTuple

KEPT = 500  # requests remembered
WINDOW_S = 300.0  # what "the last minutes" means for the per-model figures


class Recent(NamedTuple):
    """One request that ended (a tuple: built on every request, it must cost little)."""

    at: float  # wall clock, seconds
    method: str
    path: str
    model: str | None
    node: str | None
    status: int
    outcome: str  # ok | error | broken | abandoned (cortex.access.outcome)
    secs: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    key: str | None = None  # the API key's name, never the key

    def as_json(self) -> dict[str, Any]:
        return self._asdict()


class RecentRequests:
    def __init__(self, kept: int = KEPT) -> None:
        self._items: collections.deque[Recent] = collections.deque(maxlen=kept)

    def add(self, item: Recent) -> None:
        self._items.append(item)

    def last(self, n: int) -> list[Recent]:
        return list(self._items)[-n:][::-1]  # newest first

    def errors(self, n: int) -> list[Recent]:
        return [r for r in reversed(self._items) if r.outcome != "ok"][:n]

    def items(self) -> list[Recent]:
        return list(self._items)


def per_model(
    items: Iterable[Recent], now: float | None = None, window_s: float = WINDOW_S
) -> dict[str, dict[str, Any]]:
    """Per model, over the requests that ended in the last ``window_s``: how many, how many
    failed, median time to first token and median decode rate."""
    now = time.time() if now is None else now
    grouped: dict[str, list[Recent]] = {}
    for item in items:
        if item.model and now - item.at <= window_s:
            grouped.setdefault(item.model, []).append(item)
    summary = {}
    for model, group in grouped.items():
        ttfts = [r.ttft_s for r in group if r.ttft_s is not None]
        rates = [r.tokens_per_s for r in group if r.tokens_per_s is not None]
        summary[model] = {
            "requests": len(group),
            "errors": sum(r.outcome != "ok" for r in group),
            "ttft_s": round(statistics.median(ttfts), 3) if ttfts else None,
            "tokens_per_s": round(statistics.median(rates), 1) if rates else None,
        }
    return summary
