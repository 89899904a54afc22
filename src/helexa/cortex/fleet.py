"""What cortex knows about each neuron, kept fresh by the poller (§2.2).

One ``NeuronState`` per neuron owns everything cortex holds about it — the poller's
picture, cortex's own requests in flight, the memory ledger of the loads it started, the
unloads under way — and every change goes through its methods. The poll snapshot and
cortex's own changes are reconciled by sequence number: a snapshot taken before cortex
loaded or unloaded a model cannot undo that change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import orjson
from pydantic import TypeAdapter, ValidationError

from helexa.core.auth import bearer, is_loopback
from helexa.core.wire import Discovery, Health, ModelStatus
from helexa.cortex.catalogue import Catalogue, ModelProfile
from helexa.cortex.config import NeuronEntry, PollerSettings
from helexa.cortex.placement import CPU_POOL, Device, NeuronView, Resident, need_mb
from helexa.cortex.upstream import LocalExhaustion, Pool, UpstreamError

log = logging.getLogger("helexa.cortex.fleet")

_MODEL_LIST = TypeAdapter(list[ModelStatus])


@dataclass(frozen=True)
class Reservation:
    """Memory a cold load cortex started will take once it lands, in one pool."""

    pool: int
    mb: int


class NeuronState:
    def __init__(self, name: str, endpoint: str, pool: Pool) -> None:
        self.name = name
        self.endpoint = endpoint
        self.pool = pool
        self.healthy = False  # answered its recent polls: routable
        self.responsive = False  # answered the last one; a first miss takes it off new work
        self.failures = 0
        self.down_since: float | None = None  # wall clock of the first of the failed polls
        self.last_error = ""  # why the last poll failed, as a client may read it
        self.ever_seen = False
        self.polled_at: float | None = None  # wall clock of the last poll that answered
        self.discovery: Discovery | None = None
        self.rediscover = False  # reconnected: its hardware may have changed
        self.health: Health | None = None
        self.draining = False  # shutting down: answers what it has, takes nothing new
        self.models: dict[str, ModelStatus] = {}
        self.reservations: dict[str, Reservation] = {}  # the ledger of cortex's cold loads
        self.loads: dict[str, asyncio.Future[None]] = {}  # load posts under way: join, not repost
        self.unloading: set[str] = set()
        self.cycles = 0  # loads + unloads since the last defrag
        self._in_flight: dict[str, int] = {}  # requests cortex is proxying here
        self._last_used: dict[str, float] = {}
        self._seq = 0  # numbers cortex's own changes
        self._changed: dict[str, int] = {}  # model -> number of cortex's last change to it
        self._polled_seq = 0  # the number current when the applied snapshot was taken
        # cortex's own requests that overlapped the /health call under way (None: no call):
        # the neuron's counts may include any of them.
        self._polling_in_flight: dict[str, int] | None = None
        self._others: dict[str, int] = {}  # others' requests the neuron last reported
        self._held_until_polled: dict[str, int] = {}  # reservation -> the change that ended it

    # -- reading ------------------------------------------------------------------------------

    def why_unroutable(self, now: float | None = None) -> str | None:
        """Why no new request goes here, for a client's 503 (``neuron n1 down since
        21:50:03 UTC (12 s): connection refused``); None while it is routable."""
        if self.draining:
            return f"neuron {self.name} is shutting down"
        if self.healthy and self.responsive:
            return None
        if self.down_since is None:
            return f"neuron {self.name} has not answered a poll yet"
        since = time.strftime("%H:%M:%S UTC", time.gmtime(self.down_since))
        age = max(0, round((time.time() if now is None else now) - self.down_since))
        return f"neuron {self.name} down since {since} ({age} s): {self.last_error}"

    def loaded(self, model_id: str) -> bool:
        status = self.models.get(model_id)
        return status is not None and status.status == "loaded"

    def status_of(self, model_id: str) -> str | None:
        status = self.models.get(model_id)
        return status.status if status else None

    def busy(self, model_id: str | None = None) -> int:
        """Requests on the model (all models: None): cortex's own in flight now, plus what
        the neuron last reported in flight or queued beyond cortex's own (other clients,
        another gateway)."""
        if model_id is not None:
            return self._in_flight.get(model_id, 0) + self._others.get(model_id, 0)
        return sum(self._in_flight.values()) + sum(self._others.values())

    def last_used(self, model_id: str) -> float:
        return self._last_used.get(model_id, 0.0)

    def pending_mb(self) -> dict[int, int]:
        pending: dict[int, int] = {}
        for r in self.reservations.values():
            pending[r.pool] = pending.get(r.pool, 0) + r.mb
        return pending

    def fresh(self, model_id: str) -> bool:
        """Changed by cortex after the applied snapshot was taken: the neuron's memory
        figures predate it."""
        return self._changed.get(model_id, -1) > self._polled_seq

    def rewrite_url(self, url: str) -> str:
        """A neuron that says localhost means itself: use the configured host instead."""
        parts = urlsplit(url)
        if parts.hostname in {"localhost", "127.0.0.1", "0.0.0.0", "::1"}:
            own = urlsplit(self.endpoint)
            netloc = f"{own.hostname}:{parts.port or own.port}"
            return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return url

    # -- cortex's requests --------------------------------------------------------------------

    def begin_request(self, model_id: str) -> None:
        self._in_flight[model_id] = self._in_flight.get(model_id, 0) + 1
        if self._polling_in_flight is not None:
            self._polling_in_flight[model_id] = self._polling_in_flight.get(model_id, 0) + 1
        self._last_used[model_id] = time.monotonic()

    def end_request(self, model_id: str) -> None:
        self._in_flight[model_id] -= 1
        self._last_used[model_id] = time.monotonic()

    # -- cortex's loads and unloads -----------------------------------------------------------

    def _mark(self, model_id: str) -> None:
        self._seq += 1
        self._changed[model_id] = self._seq

    def reserve(self, model_id: str, pool: int, mb: int) -> None:
        self.reservations[model_id] = Reservation(pool, mb)

    def release(self, model_id: str) -> None:
        self.reservations.pop(model_id, None)

    def release_after_poll(self, key: str) -> None:
        """Keep a reservation until a poll that began after now: memory this neuron lent
        shows in its free figure from then on (until then cortex would see it free)."""
        self._seq += 1
        self._held_until_polled[key] = self._seq

    def landed(self, status: ModelStatus) -> None:
        """A load cortex asked for answered with the model's status."""
        self.models[status.id] = status
        self._mark(status.id)
        if status.status == "loaded":
            self.cycles += 1
            # Its requests are about to run: not the least recently used one to evict.
            self._last_used[status.id] = time.monotonic()

    def begin_unload(self, model_id: str) -> None:
        """Not routable from now on; a failed unload comes back with the next poll."""
        self.models.pop(model_id, None)
        self.unloading.add(model_id)
        self._mark(model_id)

    def end_unload(self, model_id: str, *, done: bool) -> None:
        self.unloading.discard(model_id)
        self._mark(model_id)
        if done:
            self._last_used.pop(model_id, None)
            self.cycles += 1

    def vanished(self, model_id: str) -> None:
        """The neuron answered that it does not have the model (evicted behind our back,
        restarted): not routable until a poll shows it again."""
        self.models.pop(model_id, None)

    def engine_crashed(self, model_id: str) -> None:
        """The neuron answered that the model's worker crashed (it is being reloaded, or
        given up): not routable until a poll shows it loaded again."""
        status = self.models.get(model_id)
        if status is not None:
            self.models[model_id] = status.model_copy(update={"status": "failed"})

    def saw_draining(self) -> None:
        """A request was turned away as the neuron shuts down: no new ones until a poll
        shows it serving again."""
        self.draining = True

    # -- the poller ---------------------------------------------------------------------------

    def poll_began(self) -> int:
        return self._seq

    def asking_health(self) -> None:
        """The neuron is about to count requests for its /health answer: from now until
        the answer, every request of cortex's own may be among them (one that begins during
        the call must not read as another client's until the next poll)."""
        self._polling_in_flight = {m: n for m, n in self._in_flight.items() if n}

    def has_others(self) -> bool:
        """The last poll counted requests that were not cortex's own."""
        return bool(self._others)

    def apply_poll(self, models: list[ModelStatus], health: Health, began: int) -> None:
        self.health = health
        self.draining = health.draining
        # The neuron's counts include cortex's own requests of the moment: the rest are
        # other clients'.
        ours = self._polling_in_flight or {}
        self._polling_in_flight = None
        self._others = {
            model_id: others
            for model_id, info in health.models.items()
            if (others := info.in_flight + info.queued - ours.get(model_id, 0)) > 0
        }
        snapshot = {m.id: m for m in models if m.id not in self.unloading}
        for model_id, seq in self._changed.items():
            if seq > began:  # cortex changed it after the snapshot was taken: ours wins
                if model_id in self.models:
                    snapshot[model_id] = self.models[model_id]
                else:
                    snapshot.pop(model_id, None)
        for model_id in set(self.models) - set(snapshot):
            log.info("model pruned", extra={"neuron": self.name, "model": model_id})
            self._last_used.pop(model_id, None)
        self.models = snapshot
        self._polled_seq = began
        self._changed = {m: s for m, s in self._changed.items() if s > began}
        for key, seq in list(self._held_until_polled.items()):
            if seq <= began:  # this poll's figures include it
                del self._held_until_polled[key]
                self.reservations.pop(key, None)
        self.failures = 0
        self.down_since = None
        self.last_error = ""
        self.polled_at = time.time()
        self.responsive = True
        self.rediscover = False
        if not self.healthy:
            log.info("neuron healthy", extra={"neuron": self.name, "models": len(self.models)})
        self.healthy = True
        self.ever_seen = True

    def request_failed(self, exc: BaseException) -> None:
        if self.responsive:
            log.warning(
                "neuron unresponsive: no new requests until it answers a poll",
                extra={"neuron": self.name, "error": str(exc)},
            )
        self.responsive = False

    def poll_failed(self, exc: BaseException, unhealthy_after: int) -> None:
        self._polling_in_flight = None
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.time()
        self.last_error = failure_reason(exc)
        self.responsive = False
        if self.healthy and self.failures >= unhealthy_after:
            self.healthy = False
            self.rediscover = True
            self.models.clear()  # nothing there can be served; the poller refills it
            # Requests waiting on it fail over now rather than at their own timeouts. A
            # neuron seen draining closes its port only once its streams have ended: this
            # is its exit, not a crash, and there is nothing left to cut.
            why = "shut down" if self.draining else "stopped answering health checks"
            self.pool.abort(f"neuron {self.name} {why}")
            log.log(
                logging.INFO if self.draining else logging.WARNING,
                "neuron unhealthy",
                extra={
                    "neuron": self.name,
                    "failures": self.failures,
                    "error": str(exc),
                    "drained": self.draining or None,
                },
            )
        elif self.failures == 1 and self.healthy:
            log.warning(
                "neuron unresponsive: no new requests until it answers",
                extra={"neuron": self.name, "error": str(exc)},
            )
        elif not self.ever_seen and self.failures == 1:
            log.warning("neuron unreachable", extra={"neuron": self.name, "error": str(exc)})


def _said(body: bytes) -> str:
    """The neuron's own words for a refused poll (a 421 names the setting to change)."""
    try:
        message = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""
    return f": {str(message)[:300]}" if message else ""


def failure_reason(exc: BaseException) -> str:
    """A failed poll in a few words: the OS's reason for a refused or timed-out connection
    (found down the exception's causes), else the error's own text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, TimeoutError):
            return "timed out"
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def view_of(
    state: NeuronState,
    catalogue: Catalogue,
    sized_mb: Callable[[ModelProfile], int | None] | None = None,
    pins: Collection[str] = (),
) -> NeuronView:
    """The placement module's picture of one neuron.

    A resident counts as the larger of what it uses and its profile's estimate (the
    estimate is what placement promised it: ``vram_mb``, else the size a neuron reported,
    ``sized_mb``; a neuron's free figure only shows use), and a model loaded since the last
    poll counts in full: the free figure predates it (unless that poll's /health already
    listed it loaded). A pooled model counts its share here only. A model still loading is
    busy; a poisoned one is not (evicting it is how its memory comes back).
    """
    residents = []
    unaccounted: dict[int, int] = {}
    for model_id, status in state.models.items():
        profile = catalogue.profile(model_id)
        estimate = need_mb(profile, sized_mb(profile) if sized_mb else None) if profile else 0
        # A pooled model holds only its share here (the rest is lent by other neurons).
        size = status.vram_used_mb if status.rpc else max(status.vram_used_mb, estimate)
        pools = tuple(status.devices) or (CPU_POOL,)
        # A fresh one is not in the free figure, unless the /health that gave the figure
        # (asked after the model list) already had it loaded.
        polled = state.health.models.get(model_id) if state.health is not None else None
        counted = not state.fresh(model_id) or (polled is not None and polled.status == "loaded")
        reported = status.vram_used_mb if counted else 0
        reserved = model_id in state.reservations  # already in pending_mb: count it once
        for pool in pools:
            if not reserved:
                unaccounted[pool] = unaccounted.get(pool, 0) + size - reported
        residents.append(
            Resident(
                model_id=model_id,
                size_mb=size,
                pools=pools,
                last_used=state.last_used(model_id),
                in_flight=state.busy(model_id) + (status.status == "loading"),
                pinned=bool(profile and state.name in profile.pinned_on) or model_id in pins,
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
        loopback=is_loopback(urlsplit(state.endpoint).hostname or ""),
        healthy=state.healthy and state.responsive and not state.draining,
        devices=devices,
        cpu_free_mb=cpu_free - unaccounted.get(CPU_POOL, 0),
        pending_mb=state.pending_mb(),
        residents=tuple(residents),
    )


class Fleet:
    def __init__(
        self,
        entries: list[NeuronEntry],
        settings: PollerSettings,
        on_round: Callable[[], None] | None = None,
        token: str | None = None,  # sent to every neuron whose entry names none
    ) -> None:
        self.settings = settings
        self._on_round = on_round
        self.neurons: dict[str, NeuronState] = {
            e.name: NeuronState(
                e.name, e.endpoint, Pool(e.endpoint, headers=bearer(e.token or token))
            )
            for e in entries
        }
        self._task: asyncio.Task[None] | None = None
        self.last_round_at: float | None = None  # monotonic end of the last complete round
        self._round = asyncio.Event()  # set after every round: waiters re-check the picture

    async def get(self, state: NeuronState, path: str) -> bytes:
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
            raise UpstreamError(f"GET {path} answered {response.status}{_said(body)}")
        return body

    async def poll_one(self, state: NeuronState) -> None:
        began = state.poll_began()
        try:
            if state.discovery is None or state.rediscover:
                state.discovery = Discovery.model_validate_json(await self.get(state, "/discovery"))
            models = _MODEL_LIST.validate_json(await self.get(state, "/models"))
            state.asking_health()
            health = Health.model_validate_json(await self.get(state, "/health"))
        except LocalExhaustion as exc:
            # Out of file descriptors here: says nothing about the neuron.
            log.warning("poll skipped", extra={"neuron": state.name, "error": str(exc)})
            return
        except (UpstreamError, ValidationError, ValueError, orjson.JSONDecodeError) as exc:
            state.poll_failed(exc, self.settings.unhealthy_after)
            return
        state.apply_poll(models, health, began)

    def report_failure(self, state: NeuronState, exc: BaseException) -> None:
        """A proxy-side connection failure: no new requests there until the next poll
        answers. Only the poller marks a neuron down (a burst of failed requests from one
        blip must not cut every stream it is serving)."""
        state.request_failed(exc)

    async def poll_all(self) -> None:
        results = await asyncio.gather(
            *(self.poll_one(s) for s in self.neurons.values()), return_exceptions=True
        )
        for state, result in zip(self.neurons.values(), results, strict=True):
            if isinstance(result, Exception):  # a bug, not a neuron failure: keep polling
                log.error(
                    "poll error",
                    extra={"neuron": state.name, "error": repr(result)},
                    exc_info=result,
                )
        self.last_round_at = time.monotonic()
        self._round.set()
        self._round = asyncio.Event()

    async def next_round(self, timeout: float) -> None:
        """Wait for the next poll round to finish (or ``timeout``)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._round.wait()

    async def run(self) -> None:
        """The poller, supervised: an unexpected error is logged and the loop goes on."""
        while True:
            started = time.monotonic()
            try:
                await self.poll_all()
                if self._on_round is not None:
                    self._on_round()
            except Exception as exc:
                log.error("poller round failed", extra={"error": repr(exc)}, exc_info=exc)
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

    def serving(self, model_id: str, exclude: frozenset[str] = frozenset()) -> list[NeuronState]:
        """The neurons a request for ``model_id`` may go to now: healthy, not draining (it
        would refuse: better a cold load elsewhere), with the model loaded; of those, the
        ones that answered their last health check, when any did."""
        candidates = [
            s
            for s in self.neurons.values()
            if s.healthy and not s.draining and s.name not in exclude and s.loaded(model_id)
        ]
        return [s for s in candidates if s.responsive] or candidates

    def healthy_count(self) -> int:
        return sum(s.healthy for s in self.neurons.values())

    def view_age_s(self) -> float | None:
        """Seconds since the poller last finished a round (None: never)."""
        if self.last_round_at is None:
            return None
        return time.monotonic() - self.last_round_at

    def stale(self) -> bool:
        """The picture is older than a few rounds: the poller is stuck or dead."""
        age = self.view_age_s()
        limit = 3 * (self.settings.interval_s + self.settings.timeout_s)
        return age is None or age > limit
