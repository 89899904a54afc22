"""Harness names → engines. The one place that knows which engines exist; each is imported
only when configured, so a host without one engine's library still runs the others."""

from __future__ import annotations

import importlib.util
import logging

from helexa.neuron.config import NeuronSettings
from helexa.neuron.devices import DevicePool
from helexa.neuron.harness.base import Harness

log = logging.getLogger("helexa.neuron.harness")

KNOWN = ("transformers", "llamacpp")
LIBRARY = {"transformers": "transformers", "llamacpp": "llama_cpp"}


def available(name: str) -> bool:
    return importlib.util.find_spec(LIBRARY[name]) is not None


def configured(settings: NeuronSettings) -> list[str]:
    """The engines this neuron runs, checked without importing them: one whose library is
    missing is skipped with a warning when it is only there by default, and is a startup
    error when the config names it."""
    explicit = "harnesses" in settings.model_fields_set
    names: list[str] = []
    for entry in settings.harnesses:
        if entry.name not in KNOWN:
            raise ValueError(f"unknown harness {entry.name!r} in config (known: {KNOWN})")
        if not available(entry.name):
            message = f"the {entry.name} harness needs the {LIBRARY[entry.name]} package"
            if explicit:
                raise ValueError(f"{message}: pip install 'helexa[neuron]'")
            log.warning("harness unavailable", extra={"harness": entry.name, "error": message})
            continue
        names.append(entry.name)
    return names


def build_harnesses(
    settings: NeuronSettings, pool: DevicePool, names: list[str] | None = None
) -> dict[str, Harness]:
    """The engines ``names`` (default: every configured one), built on ``pool``'s devices."""
    harnesses: dict[str, Harness] = {}
    for name in configured(settings) if names is None else names:
        harness = _build(name, settings, pool)
        pool.track(harness.memory_used_bytes)
        harnesses[name] = harness
    return harnesses


def _build(name: str, settings: NeuronSettings, pool: DevicePool) -> Harness:
    if name == "transformers":
        from helexa.neuron.harness.transformers.harness import TransformersHarness

        hf = settings.harness.transformers
        return TransformersHarness(
            pool,
            settings=hf,
            model_dirs=settings.model_dirs,
            wait_timeout_s=settings.admission.queue_timeout_s,
        )
    from helexa.neuron.harness.llamacpp.harness import LlamaCppHarness

    llama = settings.harness.llamacpp
    return LlamaCppHarness(
        pool,
        settings=llama,
        hf_cache=llama.hf_cache or settings.harness.transformers.hf_cache,
        model_dirs=settings.model_dirs,
        cpu_threads=llama.threads or settings.cpu.threads,
        wait_timeout_s=settings.admission.queue_timeout_s,
    )
