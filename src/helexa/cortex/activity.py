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
    """The last ``kept`` requests. The access log adds one per request, so what it adds is
    a bare tuple holding the request's record; ``Recent`` rows are built when read."""

    def __init__(self, kept: int = KEPT) -> None:
        self._items: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=kept)

    def add(
        self, at: float, method: str, path: str, status: int, outcome: str, secs: float, record: Any
    ) -> None:
        self._items.append((at, method, path, status, outcome, secs, record))

    def items(self) -> list[Recent]:
        return [_row(*item) for item in self._items]

    def last(self, n: int) -> list[Recent]:
        return self.items()[-n:][::-1]  # newest first

    def errors(self, n: int) -> list[Recent]:
        return [r for r in reversed(self.items()) if r.outcome != "ok"][:n]


def _row(
    at: float, method: str, path: str, status: int, outcome: str, secs: float, record: Any
) -> Recent:
    """A request as the dashboard shows it, from its access-log record (a RequestRecord)."""
    usage = record.usage or {}
    return Recent(
        at=at,
        method=method,
        path=path,
        model=record.model_id or record.model,
        node=record.node,
        status=status,
        outcome=outcome,
        secs=round(secs, 4),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        ttft_s=record.ttft_s,
        tokens_per_s=record.tokens_per_s,
        error=record.error,
        key=record.key,
    )


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
