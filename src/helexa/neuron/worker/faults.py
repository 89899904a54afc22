"""The test-only fault hook: ``HELEXA_TEST_FAULT=load:<text>:<SIGNAL>`` makes a worker send
itself ``SIGNAL`` when asked to load a model whose id contains ``<text>``, so tests can crash
a worker on every load of one model. The signal is real (faulthandler, the exit status, the
neuron's recovery all run as for a real fault); nothing else reads the variable."""

from __future__ import annotations

import logging
import os
import signal
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
    match, _, name = rest.rpartition(":")
    if stage != "load" or not match:
        return None
    try:
        sig = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except KeyError:
        return None
    return FaultHook(stage=stage, match=match, signal=sig)


def on_load(hook: FaultHook | None, model_id: str) -> None:
    if hook is not None and hook.match in model_id:
        log.warning(
            "test fault hook firing", extra={"model_id": model_id, "signal": hook.signal.name}
        )
        os.kill(os.getpid(), hook.signal)
