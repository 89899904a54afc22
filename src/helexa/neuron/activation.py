"""Pre-warm of ``default_models`` after the listener is bound (§1.6), and its tracker."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from helexa.core.errors import ApiError
from helexa.core.wire import Activation, ActivationFailure, ModelSpec

log = logging.getLogger("helexa.neuron.activation")


class ActivationTracker:
    def __init__(self, specs: list[ModelSpec]) -> None:
        self.pending = [s.model_id for s in specs]
        self.in_progress: str | None = None
        self.completed: list[str] = []
        self.failed: list[ActivationFailure] = []

    @property
    def state(self) -> str:
        return "pre_warming" if self.pending or self.in_progress else "ready"

    def start(self, model_id: str) -> None:
        self.pending.remove(model_id)
        self.in_progress = model_id

    def succeed(self, model_id: str) -> None:
        self.in_progress = None
        self.completed.append(model_id)

    def fail(self, model_id: str, error: str) -> None:
        self.in_progress = None
        self.failed.append(ActivationFailure(model_id=model_id, error=error))

    def snapshot(self) -> Activation:
        return Activation(
            state="pre_warming" if self.state == "pre_warming" else "ready",
            pending=list(self.pending),
            in_progress=self.in_progress,
            completed=list(self.completed),
            failed=list(self.failed),
        )


async def prewarm(
    specs: list[ModelSpec],
    tracker: ActivationTracker,
    load: Callable[[ModelSpec], Awaitable[object]],
) -> None:
    """Load each default model in turn (one at a time: VRAM contention); never raise."""
    for spec in specs:
        tracker.start(spec.model_id)
        started = time.monotonic()
        try:
            await load(spec)
        except Exception as exc:
            reason = exc.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
            tracker.fail(spec.model_id, reason)
            log.warning("pre-warm failed", extra={"model_id": spec.model_id, "error": reason})
            continue
        tracker.succeed(spec.model_id)
        log.info(
            "pre-warm loaded",
            extra={"model_id": spec.model_id, "secs": round(time.monotonic() - started, 3)},
        )
    if specs:
        log.info(
            "pre-warm done",
            extra={"completed": len(tracker.completed), "failed": len(tracker.failed)},
        )
