"""What cortex knows about each neuron, kept fresh by the poller (§2.2)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import orjson
from pydantic import TypeAdapter, ValidationError

from helexa.core.catalogue import Catalogue, ModelProfile
from helexa.core.placement import CPU_POOL, Device, NeuronView, Resident, need_mb
from helexa.core.wire import Discovery, Health, ModelStatus
from helexa.cortex.config import NeuronEntry, PollerSettings
from helexa.cortex.upstream import Pool, UpstreamError

log = logging.getLogger("helexa.cortex.fleet")

_MODEL_LIST = TypeAdapter(list[ModelStatus])


@dataclass
class NeuronState:
    name: str
    endpoint: str
    pool: Pool
    healthy: bool = False
    failures: int = 0
    ever_seen: bool = False
    discovery: Discovery | None = None
    health: Health | None = None
    models: dict[str, ModelStatus] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)  # requests cortex is proxying
    last_used: dict[str, float] = field(default_factory=dict)
    pending_mb: dict[int, int] = field(default_factory=dict)  # cold loads cortex started here
    cycles: int = 0  # loads + unloads since the last defrag
    # What cortex itself changed since the poll it last applied began: a poll snapshot
    # taken before a load or unload finished must not undo it.
    polled_at: float = 0.0
    loaded_at: dict[str, float] = field(default_factory=dict)
    unloading: set[str] = field(default_factory=set)
    unloaded_at: dict[str, float] = field(default_factory=dict)
    reserved_for: set[str] = field(default_factory=set)  # cold loads counted in pending_mb

    def loaded(self, model_id: str) -> bool:
        status = self.models.get(model_id)
        return status is not None and status.status == "loaded"

    def busy(self) -> int:
        return sum(self.in_flight.values())

    def rewrite_url(self, url: str) -> str:
        """A neuron that says localhost means itself: use the configured host instead."""
        parts = urlsplit(url)
        if parts.hostname in {"localhost", "127.0.0.1", "0.0.0.0", "::1"}:
            own = urlsplit(self.endpoint)
            netloc = f"{own.hostname}:{parts.port or own.port}"
            return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return url


def view_of(
    state: NeuronState,
    catalogue: Catalogue,
    sized_mb: Callable[[ModelProfile], int | None] | None = None,
) -> NeuronView:
    """The placement module's picture of one neuron.

    A resident counts as the larger of what it uses and its profile's estimate (the
    estimate is what placement promised it: ``vram_mb``, else the size a neuron reported,
    ``sized_mb``; a neuron's free figure only shows use), and a model loaded since the last
    poll counts in full: the free figure predates it.
    """
    residents = []
    unaccounted: dict[int, int] = {}
    for model_id, status in state.models.items():
        profile = catalogue.profile(model_id)
        estimate = need_mb(profile, sized_mb(profile) if sized_mb else None) if profile else 0
        size = max(status.vram_used_mb, estimate)
        pools = tuple(status.devices) or (CPU_POOL,)
        fresh = state.loaded_at.get(model_id, -1.0) >= state.polled_at
        reported = 0 if fresh else status.vram_used_mb
        reserved = model_id in state.reserved_for  # already in pending_mb: count it once
        for pool in pools:
            if not reserved:
                unaccounted[pool] = unaccounted.get(pool, 0) + size - reported
        residents.append(
            Resident(
                model_id=model_id,
                size_mb=size,
                pools=pools,
                last_used=state.last_used.get(model_id, 0.0),
                in_flight=state.in_flight.get(model_id, 0) + (status.status != "loaded"),
                pinned=bool(profile and state.name in profile.pinned_on),
                priority=profile.priority if profile else 0,
            )
        )
    free = {d.index: d.vram_free_mb for d in (state.health.devices if state.health else [])}
    devices = tuple(
        Device(
            index=d.index,
            total_mb=d.vram_total_mb,
            free_mb=free.get(d.index, 0) - unaccounted.get(d.index, 0),
        )
        for d in (state.discovery.devices if state.discovery else [])
    )
    cpu_free = state.health.cpu.memory_free_mb if state.health else 0
    return NeuronView(
        name=state.name,
        healthy=state.healthy,
        devices=devices,
        cpu_free_mb=cpu_free - unaccounted.get(CPU_POOL, 0),
        pending_mb=dict(state.pending_mb),
        residents=tuple(residents),
    )


class Fleet:
    def __init__(
        self,
        entries: list[NeuronEntry],
        settings: PollerSettings,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_round = on_round
        self.neurons: dict[str, NeuronState] = {
            e.name: NeuronState(name=e.name, endpoint=e.endpoint, pool=Pool(e.endpoint))
            for e in entries
        }
        self._task: asyncio.Task[None] | None = None

    async def _get(self, state: NeuronState, path: str) -> bytes:
        response = await state.pool.request(
            "GET",
            path,
            connect_timeout=self.settings.timeout_s,
            header_timeout=self.settings.timeout_s,
        )
        try:
            body = await response.read(self.settings.timeout_s)
        finally:
            response.close()
        if response.status != 200:
            raise UpstreamError(f"GET {path} answered {response.status}")
        return body

    async def poll_one(self, state: NeuronState) -> None:
        began = time.monotonic()
        try:
            if state.discovery is None:
                state.discovery = Discovery.model_validate_json(
                    await self._get(state, "/discovery")
                )
            models = _MODEL_LIST.validate_json(await self._get(state, "/models"))
            health = Health.model_validate_json(await self._get(state, "/health"))
        except (UpstreamError, ValidationError, ValueError, orjson.JSONDecodeError) as exc:
            self._failed(state, exc)
            return
        state.health = health
        # What cortex did after this poll began wins over the (older) snapshot.
        snapshot = {
            m.id: m
            for m in models
            if m.id not in state.unloading and state.unloaded_at.get(m.id, -1.0) < began
        }
        for model_id, loaded_at in state.loaded_at.items():
            if loaded_at >= began and state.loaded(model_id):
                snapshot[model_id] = state.models[model_id]
        for model_id in set(state.models) - set(snapshot):
            log.info("model pruned", extra={"neuron": state.name, "model": model_id})
            state.last_used.pop(model_id, None)
        state.models = snapshot
        state.polled_at = began
        state.failures = 0
        if not state.healthy:
            log.info("neuron healthy", extra={"neuron": state.name, "models": len(state.models)})
        state.healthy = True
        state.ever_seen = True

    def _failed(self, state: NeuronState, exc: BaseException) -> None:
        state.failures += 1
        if state.healthy and state.failures >= self.settings.unhealthy_after:
            state.healthy = False
            state.discovery = None  # refreshed on reconnect: the host may have changed
            state.models.clear()  # nothing there can be served; the poller refills it
            log.warning(
                "neuron unhealthy",
                extra={"neuron": state.name, "failures": state.failures, "error": str(exc)},
            )
        elif not state.ever_seen and state.failures == 1:
            log.warning("neuron unreachable", extra={"neuron": state.name, "error": str(exc)})

    def report_failure(self, state: NeuronState, exc: BaseException) -> None:
        """A proxy-side connection failure counts like a failed poll."""
        self._failed(state, exc)

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll_one(s) for s in self.neurons.values()))

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await self.poll_all()
            if self._on_round is not None:
                self._on_round()
            await asyncio.sleep(max(self.settings.interval_s - (time.monotonic() - started), 0.05))

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for state in self.neurons.values():
            state.pool.close()

    def healthy_count(self) -> int:
        return sum(s.healthy for s in self.neurons.values())
