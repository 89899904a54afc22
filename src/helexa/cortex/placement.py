"""Where a model may and should go, and what to evict for it: pure decisions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from helexa.cortex.catalogue import ModelProfile

CPU_POOL = -1  # the pool key of a neuron's CPU memory budget


@dataclass(frozen=True)
class Device:
    index: int
    total_mb: int
    free_mb: int


@dataclass(frozen=True)
class Resident:
    """A model loaded on a neuron, as the evictor sees it."""

    model_id: str
    size_mb: int
    pools: tuple[int, ...]  # device indices, or (CPU_POOL,)
    last_used: float
    in_flight: int = 0
    pinned: bool = False
    priority: int = 0


@dataclass(frozen=True)
class NeuronView:
    name: str
    healthy: bool
    devices: tuple[Device, ...]
    cpu_free_mb: int
    pending_mb: dict[int, int] = field(default_factory=dict)  # loads in flight per pool
    residents: tuple[Resident, ...] = ()
    loopback: bool = False  # cortex reaches it at a loopback address (it runs beside it)


def need_mb(profile: ModelProfile, sized_mb: int | None = None) -> int:
    """Memory a load needs: the profile's ``vram_mb``, else the size a neuron reported for
    its weights (GGUF: file + KV; dense: weights x 1.2), else 0 (unknown)."""
    if profile.vram_mb is not None:
        return profile.vram_mb
    return sized_mb or 0


def eligible_devices(profile: ModelProfile, view: NeuronView) -> list[Device]:
    return [d for d in view.devices if d.total_mb >= profile.min_device_vram_mb]


def feasible(profile: ModelProfile, view: NeuronView) -> bool:
    """Whether the neuron's hardware could ever hold the model (memory use aside)."""
    if profile.pinned_on and view.name not in profile.pinned_on:
        return False
    if profile.cpu_ok:
        return True
    return len(eligible_devices(profile, view)) >= max(profile.min_devices, 1)


def why_infeasible(profile: ModelProfile, view: NeuronView) -> str | None:
    """Why the neuron's hardware can never hold the model (None: it could)."""
    if profile.pinned_on and view.name not in profile.pinned_on:
        return f"{view.name}: not in pinned_on"
    if feasible(profile, view):
        return None
    gpus = len(view.devices)
    big = len(eligible_devices(profile, view))
    if gpus == 0:
        return f"{view.name}: CPU only"
    if big < gpus:
        return f"{view.name}: {big} of {gpus} GPUs have {profile.min_device_vram_mb} MB"
    return f"{view.name}: {gpus} GPU(s)"


def unhostable(profile: ModelProfile, views: Sequence[NeuronView]) -> str | None:
    """Why no neuron of the fleet can ever host the model, whatever is loaded or healthy;
    None when some could. ``views`` must cover every neuron, each with known hardware."""
    reasons = [why_infeasible(profile, v) for v in views]
    if not views or any(r is None for r in reasons):
        return None
    if profile.cpu_ok:
        needs = f"it is pinned to {', '.join(profile.pinned_on)}"
    else:
        needs = f"it needs {max(profile.min_devices, 1)} GPU(s)"
        if profile.min_device_vram_mb:
            needs += f" with at least {profile.min_device_vram_mb} MB each"
        if profile.pinned_on:
            needs += f" on {', '.join(profile.pinned_on)}"
    hint = "" if profile.cpu_ok else "; set min_devices = 0 in models.toml to allow CPU"
    return f"{needs} ({'; '.join(r for r in reasons if r)}){hint}"


def pools_for(profile: ModelProfile, view: NeuronView) -> list[int]:
    """Memory pools a load may use: eligible GPUs, or the CPU budget for CPU-capable
    profiles on GPU-less neurons (a GPU host still prefers its GPUs)."""
    devices = [d.index for d in eligible_devices(profile, view)]
    if profile.cpu_ok and not devices:
        return [CPU_POOL]
    return devices


def pool_free(view: NeuronView, pool: int) -> int:
    if pool == CPU_POOL:
        free = view.cpu_free_mb
    else:
        free = next((d.free_mb for d in view.devices if d.index == pool), 0)
    return free - view.pending_mb.get(pool, 0)


def best_free(profile: ModelProfile, view: NeuronView) -> int:
    pools = pools_for(profile, view)
    return max((pool_free(view, p) for p in pools), default=0)


def rank_neurons(profile: ModelProfile, views: Sequence[NeuronView]) -> list[NeuronView]:
    """Healthy feasible neurons, pinned ones first, then by most free memory."""
    candidates = [v for v in views if v.healthy and feasible(profile, v)]
    return sorted(
        candidates,
        key=lambda v: (v.name not in profile.pinned_on, -best_free(profile, v), v.name),
    )


def choose_replica(replicas: Sequence[tuple[str, int]], preferred: str | None) -> str | None:
    """Among ``(neuron, busy)`` replicas with the model loaded: the conversation's own
    replica while it is still one (its prefix cache holds the conversation), else the
    least busy (ties: first listed)."""
    if preferred is not None and any(name == preferred for name, _busy in replicas):
        return preferred
    best = min(replicas, key=lambda r: r[1], default=None)
    return best[0] if best else None


Strategy = Literal["lru", "priority"]


def plan_eviction(
    residents: Sequence[Resident],
    free_mb: int,
    need: int,
    strategy: Strategy,
) -> list[str] | None:
    """Models to unload, in order, so that ``need`` fits in one pool; None if impossible.

    Never a pinned model or one serving a request. ``lru``: least recently used first;
    ``priority``: lowest priority first, LRU among equals.
    """
    if free_mb >= need:
        return []
    movable = [r for r in residents if not r.pinned and r.in_flight == 0]
    if strategy == "priority":
        movable.sort(key=lambda r: (r.priority, r.last_used))
    else:
        movable.sort(key=lambda r: r.last_used)
    plan: list[str] = []
    for resident in movable:
        plan.append(resident.model_id)
        free_mb += resident.size_mb
        if free_mb >= need:
            return plan
    return None


@dataclass(frozen=True)
class Placement:
    neuron: str
    pool: int
    evict: tuple[str, ...] = ()


def place(
    profile: ModelProfile,
    views: Sequence[NeuronView],
    need: int,
    strategy: Strategy,
) -> Placement | None:
    """Where to cold-load: the first ranked neuron with room, else the ranked neuron and
    pool whose eviction plan is shortest. None when nothing can make room."""
    ranked = rank_neurons(profile, views)
    for view in ranked:
        for pool in sorted(pools_for(profile, view), key=lambda p: -pool_free(view, p)):
            if pool_free(view, pool) >= need:
                return Placement(view.name, pool)
    best: Placement | None = None
    for view in ranked:
        for pool in pools_for(profile, view):
            residents = [r for r in view.residents if pool in r.pools]
            plan = plan_eviction(residents, pool_free(view, pool), need, strategy)
            if plan is not None and (best is None or len(plan) < len(best.evict)):
                best = Placement(view.name, pool, tuple(plan))
    return best


# -- pooling: one GGUF model over several neurons' memory (llama.cpp RPC, docs/pooling.md) --

POOL_MARGIN = 1.05  # compute buffers on every device of a pool, on top of weights + KV
MIN_SHARE_FRACTION = 1 / 64  # a donor giving less than this of the model is not worth a hop


@dataclass(frozen=True)
class Share:
    neuron: str
    pool: int  # a GPU index, or CPU_POOL
    mb: int


@dataclass(frozen=True)
class PoolPlan:
    """A pooled load: the borrower runs the model with its share on ``borrower.pool``; each
    donor lends ``mb`` of one pool to it (an RPC server there)."""

    borrower: Share
    donors: tuple[Share, ...]

    @property
    def total_mb(self) -> int:
        return self.borrower.mb + sum(d.mb for d in self.donors)


def poolable(profile: ModelProfile) -> bool:
    """Only GGUF models (llama.cpp) can be split over other hosts' devices."""
    return profile.harness == "llamacpp"


def _donor_order(share: Share) -> tuple[bool, int, str]:
    # GPUs before CPU budgets (faster devices), then the largest share (fewer hops).
    return (share.pool == CPU_POOL, -share.mb, share.neuron)


def plan_pool(
    profile: ModelProfile,
    borrowers: Sequence[NeuronView],
    donors: Sequence[NeuronView],
    need: int,
) -> PoolPlan | None:
    """Where to run a model no one neuron has room for: a borrower (one of ``borrowers``,
    which may host it) and the fewest donor pools (of ``donors``, the borrower's other
    pools among them) whose free memory, with the borrower's own, covers ``need`` plus a
    margin; preferring fewer donors, then a borrower whose own share is on a GPU and
    largest. A borrower cortex reaches on loopback borrows from loopback neurons only (a
    donor admits the borrower by the address cortex knows it by). None when the fleet's
    free memory together is too little (or the model is not GGUF)."""
    if not poolable(profile) or need <= 0:
        return None
    target = math.ceil(need * POOL_MARGIN)
    smallest = max(int(target * MIN_SHARE_FRACTION), 1)
    offers = [
        Share(view.name, pool, pool_free(view, pool))
        for view in donors
        if view.healthy
        for pool in pools_for(profile, view)
        if pool_free(view, pool) >= smallest
    ]
    loopback = {view.name for view in donors if view.loopback}
    best: tuple[tuple[int, bool, int, str], PoolPlan] | None = None
    for view in rank_neurons(profile, borrowers):
        for pool in pools_for(profile, view):
            local = min(max(pool_free(view, pool), 0), target)
            if local < smallest:  # a borrower holds some layers (and the embeddings) itself
                continue
            left = target - local
            chosen: list[Share] = []
            for offer in sorted(offers, key=_donor_order):
                if left <= 0:
                    break
                if (offer.neuron, offer.pool) == (view.name, pool):
                    continue
                if view.loopback and offer.neuron not in loopback:
                    continue  # donors elsewhere would admit their own loopback, not it
                give = min(offer.mb, left)
                chosen.append(Share(offer.neuron, offer.pool, give))
                left -= give
            if left > 0 or not chosen:
                continue
            plan = PoolPlan(Share(view.name, pool, local), tuple(chosen))
            score = (len(chosen), pool == CPU_POOL, -local, view.name)
            if best is None or score < best[0]:
                best = (score, plan)
    return best[1] if best else None
