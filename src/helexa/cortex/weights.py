"""Sizes of profiles without ``vram_mb`` (§2.4): what a neuron says a load would take.

cortex never reads weight files and never calls the hub. It asks a neuron
(``POST /models/size``: the neuron placement is considering first, else any other healthy
one) and remembers the answer per (model, quant). The neuron sizes from its own files: a
GGUF is the file as stored plus the KV cache llama.cpp allocates (never a dequantized
guess); dense safetensors are the weights x 1.2. When no neuron can answer (weights not on
any of them yet, an old neuron), the size is unknown: placement then relies on the
neuron's own memory check, and that is logged once per model.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from helexa.core.wire import ModelSize
from helexa.cortex.catalogue import ModelProfile

log = logging.getLogger("helexa.cortex.weights")

MB = 1024 * 1024
Key = tuple[str, str | None]
# Asks one neuron (by name) for the size of a profile's load; raises when it cannot say.
AskNeuron = Callable[[str, ModelProfile], Awaitable[ModelSize]]


def key_of(profile: ModelProfile) -> Key:
    return (profile.id, profile.quant)


class WeightSizes:
    def __init__(self) -> None:
        self._known: dict[Key, int] = {}  # bytes
        self._warned: set[Key] = set()

    def known_mb(self, profile: ModelProfile) -> int | None:
        size = self._known.get(key_of(profile))
        return None if size is None else -(-size // MB)

    def remember(self, profile: ModelProfile, size: ModelSize) -> None:
        self._known[key_of(profile)] = size.bytes

    async def mb(self, profile: ModelProfile, neurons: Sequence[str], ask: AskNeuron) -> int | None:
        """The profile's size in MB: remembered, else the first of ``neurons`` that can
        say; None when none can (asked again at the next cold load)."""
        known = self.known_mb(profile)
        if known is not None:
            return known
        errors: list[str] = []
        for name in neurons:
            try:
                size = await ask(name, profile)
            except Exception as exc:  # weights missing there, an old neuron, a timeout
                errors.append(f"{name}: {str(exc)[:200]}")
                continue
            self.remember(profile, size)
            log.info(
                "model sized",
                extra={
                    "model": profile.id,
                    "quant": profile.quant,
                    "node": name,
                    "mb": self.known_mb(profile),
                    "weights_mb": -(-size.weights_bytes // MB),
                    "kv_mb": -(-size.kv_bytes // MB),
                },
            )
            return self.known_mb(profile)
        if key_of(profile) not in self._warned:
            self._warned.add(key_of(profile))
            log.warning(
                "size unknown: placing without a memory estimate",
                extra={"model": profile.id, "error": "; ".join(errors) or "no healthy neuron"},
            )
        return None
