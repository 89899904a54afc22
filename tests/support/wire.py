"""Neuron bodies built for tests: /discovery and /health (a scripted fleet), and pieces of
OpenAI chat chunks (the translators' tests)."""

from __future__ import annotations

from typing import Any

HARNESSES = ("transformers", "llamacpp")


def discovery_body(
    gpus_mb: list[int],
    harnesses: tuple[str, ...] = HARNESSES,
    *,
    hostname: str = "h",
    memory_mb: int = 64000,
) -> dict[str, Any]:
    """GPUs of the given total VRAM (none: a CPU-only host)."""
    return {
        "hostname": hostname,
        "os": "linux",
        "kernel": "6",
        "cuda_version": "12" if gpus_mb else None,
        "driver_version": None,
        "devices": [
            {"index": i, "name": f"GPU {i}", "vram_total_mb": mb} for i, mb in enumerate(gpus_mb)
        ],
        "cpu": {"cores": 8, "memory_total_mb": memory_mb},
        "harnesses": list(harnesses),
    }


def health_body(
    gpus_free_mb: list[int],
    models: dict[str, tuple[int, int]] | None = None,
    *,
    cpu_free_mb: int = 0,
) -> dict[str, Any]:
    """Free VRAM per GPU, the CPU budget left, and (in flight, queued) per model."""
    return {
        "uptime_secs": 1.0,
        "devices": [
            {"index": i, "vram_used_mb": 0, "vram_free_mb": mb} for i, mb in enumerate(gpus_free_mb)
        ],
        "cpu": {"memory_used_mb": 0, "memory_free_mb": cpu_free_mb},
        "activation": {
            "state": "ready",
            "pending": [],
            "in_progress": None,
            "completed": [],
            "failed": [],
        },
        "models": {m: {"in_flight": f, "queued": q} for m, (f, q) in (models or {}).items()},
    }


def call_delta(index: int, args: str, name: str | None = None, id_: str | None = None) -> dict:
    """A chunk delta carrying one tool-call piece (the first piece names the call)."""
    function: dict[str, Any] = {"arguments": args}
    if name:
        function["name"] = name
    call: dict[str, Any] = {"index": index, "function": function}
    if id_:
        call.update(id=id_, type="function")
    return {"tool_calls": [call]}
