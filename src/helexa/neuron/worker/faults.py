"""The test-only fault hook, read by each worker from its environment:

- ``HELEXA_TEST_FAULT=load:<text>:<SIGNAL>``: the worker sends itself ``SIGNAL`` when asked
  to load a model whose id contains ``<text>`` (a model that crashes its worker every load);
- ``HELEXA_TEST_FAULT=poison:<text>``: once such a model is loaded, its device is poisoned
  as a CUDA fault would poison it.

What follows is real (faulthandler, the exit status, the poisoned status, the neuron's
recovery); nothing else reads the variable."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("helexa.neuron.worker")

ENV = "HELEXA_TEST_FAULT"


@dataclass(frozen=True)
class FaultHook:
    stage: str
    match: str
    signal: signal.Signals


def parse(value: str | None) -> FaultHook | None:
    """The hook ``value`` describes; None for an unset, empty or malformed one."""
    if not value:
        return None
    stage, _, rest = value.partition(":")
    if stage == "poison":
        return FaultHook(stage=stage, match=rest, signal=signal.SIGKILL) if rest else None
    match, _, name = rest.rpartition(":")
    if stage != "load" or not match:
        return None
    try:
        sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        return None
    return FaultHook(stage=stage, match=match, signal=sig)


def on_load(hook: FaultHook | None, model_id: str) -> None:
    if hook is not None and hook.stage == "load" and hook.match in model_id:
        log.warning(
            "test fault hook firing", extra={"model_id": model_id, "signal": hook.signal.name}
        )
        os.kill(os.getpid(), hook.signal)


def after_load(
    hook: FaultHook | None, model_id: str, poison: Callable[[BaseException], None]
) -> None:
    if hook is not None and hook.stage == "poison" and hook.match in model_id:
        log.warning("test fault hook poisoning the device", extra={"model_id": model_id})
        poison(RuntimeError("CUDA error: an illegal memory access was encountered (test fault)"))
