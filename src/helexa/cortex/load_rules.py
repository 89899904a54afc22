"""The decisions behind loads, evictions and defrag (``loads.Loads`` carries them out):
pure functions of what cortex knows, tested without I/O."""

from __future__ import annotations

import enum

from helexa.core.errors import ApiError, unavailable
from helexa.cortex.catalogue import ModelProfile
from helexa.cortex.placement import (
    CPU_POOL,
    NeuronView,
    Placement,
    PoolPlan,
    place,
    plan_pool,
    rank_neurons,
)

# A neuron's load answers that retrying cannot change (missing weights, a bad spec, an
# architecture it cannot run, a model bigger than the host): passed on, without Retry-After.
PERMANENT_LOAD_ERRORS = frozenset({400, 403, 404, 413, 422})


class Unplaced(enum.Enum):
    NO_HOST = "no healthy neuron can host the model"
    NO_ROOM = "no neuron has room, even evicting, and no pool covers it"


def decide_placement(
    profile: ModelProfile,
    hosts: list[NeuronView],
    donors: list[NeuronView],
    need_mb: int,
    strategy: str,
    *,
    pool: bool,
) -> Placement | PoolPlan | Unplaced:
    """Where a cold load goes: one neuron (evicting per ``strategy`` if need be), else
    (``pool``: on fresh figures only, stale ones would split a model that fits) the
    model's layers over a borrower and donors (GGUF)."""
    if not rank_neurons(profile, hosts):
        return Unplaced.NO_HOST
    placement = place(profile, hosts, need_mb, strategy)
    if placement is not None:
        return placement
    pooled = plan_pool(profile, hosts, donors, need_mb) if pool else None
    return pooled if pooled is not None else Unplaced.NO_ROOM


def spec_for(profile: ModelProfile, has_gpus: bool, pool: int | None = None) -> dict[str, object]:
    """The ModelSpec a load of ``profile`` sends (and its sizing and pulls): with the pool
    placement planned for, so the load lands where the room was made; without one, the
    neuron chooses (a CPU-capable model on a neuron without GPUs: its CPU)."""
    spec: dict[str, object] = {"model_id": profile.id, "harness": profile.harness}
    if profile.quant:
        spec["quant"] = profile.quant
    if pool == CPU_POOL or (pool is None and profile.cpu_ok and not has_gpus):
        spec["devices"] = []
    elif pool is not None and profile.min_devices <= 1:
        spec["devices"] = [pool]
    return spec


def load_refused(
    model_id: str, node: str, status: int, error: dict[str, object], retry_after_s: int
) -> ApiError:
    """The client's answer to a neuron refusing a load: passed on when retrying cannot
    help, a 503 ``downloading`` while its weights are on their way there, else a 503."""
    reason = str(error.get("message") or f"status {status}")
    message = f"loading {model_id!r} on {node} failed: {reason}"
    if status in PERMANENT_LOAD_ERRORS:
        return ApiError(
            status,
            message,
            type=str(error.get("type") or "invalid_request_error"),
            code=str(error.get("code") or "load_failed"),
            param="model",
        )
    if error.get("code") == "downloading":
        return unavailable(
            f"{model_id!r} is not on {node} yet: {reason}",
            code="downloading",
            retry_after=retry_after_s,
        )
    return unavailable(message, code="load_failed", retry_after=retry_after_s)


def neuron_error(node: str, status: int, error: dict[str, object], doing: str) -> ApiError:
    """An admin command a neuron refused, in the neuron's own words and code."""
    param = error.get("param")
    return ApiError(
        status if status >= 400 else 502,
        f"{doing} on {node}: {error.get('message') or f'status {status}'}",
        type=str(error.get("type") or "invalid_request_error"),
        code=str(error.get("code") or "neuron_error"),
        param=param if isinstance(param, str) else None,
    )


def defrag_due(cycles: int, threshold: int, running: bool) -> bool:
    """Recycle a neuron's workers after ``threshold`` load/unload cycles (0: never)."""
    return bool(threshold) and cycles >= threshold and not running
