"""The one owner of what runs where (§2.5): cold loads with single-flight, evictions,
pooled loads, admin loads/unloads/pulls/deletes/pins, and defrag.

Its decisions are pure functions (``placement``, ``load_rules``); its effects go through an
injected ``NeuronClient`` (tests give it a scripted one). Planning and booking happen
under one lock with no network call inside, and each neuron has a lock of its own held
for its loads, unloads and recycles, so a hung neuron holds up only what was placed on it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import ValidationError

from helexa.core.errors import ApiError, not_found, unavailable
from helexa.core.wire import DownloadInfo, ModelSize
from helexa.cortex.catalogue import Catalogue, ModelProfile
from helexa.cortex.config import CortexSettings
from helexa.cortex.fleet import Fleet, NeuronState, view_of
from helexa.cortex.load_rules import (
    Unplaced,
    decide_placement,
    defrag_due,
    load_refused,
    neuron_error,
    spec_for,
)
from helexa.cortex.metrics import Metrics
from helexa.cortex.neuron_client import NeuronClient, NeuronRefused
from helexa.cortex.placement import (
    Placement,
    PoolPlan,
    choose_replica,
    feasible,
    need_mb,
    rank_neurons,
    unhostable,
)
from helexa.cortex.pooling import Pools
from helexa.cortex.upstream import LocalExhaustion, UpstreamError
from helexa.cortex.weights import WeightSizes

log = logging.getLogger("helexa.cortex.loads")


class Loads:
    def __init__(
        self,
        settings: CortexSettings,
        catalogue: Catalogue,
        fleet: Fleet,
        metrics: Metrics,
        client: NeuronClient,
        weights: WeightSizes | None = None,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.fleet = fleet
        self.metrics = metrics
        self.client = client
        self.weights = weights or WeightSizes()
        self.pools = Pools(fleet.neurons, client)
        self.pins: set[str] = set()  # models pinned at run time (the dashboard): never evicted
        self._cold: dict[str, asyncio.Future[NeuronState]] = {}
        self._placing = asyncio.Lock()
        self._neuron_locks: dict[str, asyncio.Lock] = {
            name: asyncio.Lock() for name in fleet.neurons
        }
        self._defrag_tasks: dict[str, asyncio.Task[None]] = {}

    def _unavailable(self, message: str, code: str) -> ApiError:
        return unavailable(message, code=code, retry_after=self.settings.proxy.retry_after_s)

    # -- cold loads ------------------------------------------------------------------------

    async def cold_load(
        self, profile: ModelProfile, exclude: frozenset[str] = frozenset()
    ) -> NeuronState:
        """One load per model however many requests ask for it at once."""
        pending = self._cold.get(profile.id)
        if pending is None:
            pending = asyncio.ensure_future(self._cold_load(profile, exclude))
            self._cold[profile.id] = pending
            pending.add_done_callback(lambda _f: self._cold.pop(profile.id, None))
        return await asyncio.shield(pending)

    async def _cold_load(self, profile: ModelProfile, exclude: frozenset[str]) -> NeuronState:
        need = await self._need(profile, exclude)
        rechecked = False
        while True:
            # Planning and booking (the victims taken off routing, the memory reserved in
            # the neuron's ledger) happen under one lock with no network call inside, so
            # concurrent cold loads never plan against the same free memory or victims,
            # and a hung neuron holds up only the loads placed on it.
            async with self._placing:
                # Waiting for a neuron, the model may have landed (a defrag's reload, an
                # admin load): use it rather than load it twice.
                serving = self.fleet.serving(profile.id, exclude)
                ready = choose_replica([(s.name, s.busy()) for s in serving], None)
                if ready is not None:
                    return self.fleet.neurons[ready]
                try:
                    # Pooling only on fresh figures: stale ones would split a model that fits.
                    placement = self._plan(profile, exclude, need, pool=rechecked)
                except ApiError as exc:
                    # The picture is as of the last poll: others' requests that have ended
                    # since may still seem to hold a victim, and memory figures lag a
                    # load or an unload. Ask the neurons again once before a 503.
                    stale = [s for s in self.fleet.neurons.values() if s.healthy]
                    if exc.code != "insufficient_capacity" or rechecked:
                        raise
                    placement = None
                else:
                    if isinstance(placement, PoolPlan):
                        state = self.fleet.neurons[placement.borrower.neuron]
                    else:
                        state = self.fleet.neurons[placement.neuron]
                    neuron_lock = self._neuron_locks[state.name]
                    if await _try_acquire(neuron_lock):
                        if isinstance(placement, PoolPlan):
                            self._reserve_pool(profile.id, placement)
                        else:
                            for victim in placement.evict:
                                state.begin_unload(victim)
                            state.reserve(profile.id, placement.pool, need)
                        break
            if placement is None:
                rechecked = True
                await asyncio.gather(*(self.fleet.poll_one(s) for s in stale))
                continue
            # That neuron is busy (a load, a defrag): wait for it without holding up
            # planning for the others, then plan again on fresh numbers.
            async with neuron_lock:
                pass
        landed = False
        try:
            if isinstance(placement, PoolPlan):
                await self._load_pooled(state, profile, placement)
            else:
                await self._evict_and_load(state, profile, placement)
            landed = True
        finally:
            if isinstance(placement, PoolPlan):
                self._unreserve_pool(profile.id, placement, landed=landed)
            else:
                state.release(profile.id)
            neuron_lock.release()
        self._maybe_defrag(state)
        return state

    def _plan(
        self, profile: ModelProfile, exclude: frozenset[str], need: int, *, pool: bool = True
    ) -> Placement | PoolPlan:
        hosts = [
            view_of(s, self.catalogue, self.weights.known_mb, self.pins)
            for s in self.fleet.neurons.values()
            if s.name not in exclude
        ]
        # Any healthy neuron may lend to a pool, those excluded as the model's host among them.
        donors = [
            view_of(s, self.catalogue, self.weights.known_mb) for s in self.fleet.neurons.values()
        ]
        strategy = self.settings.eviction.strategy
        decision = decide_placement(profile, hosts, donors, need, strategy, pool=pool)
        if decision is Unplaced.NO_HOST:
            never = self._never_hostable(profile)
            if never is not None:
                raise ApiError(
                    400,
                    f"no neuron of this fleet can ever host {profile.id!r}: {never}",
                    code="model_unservable",
                    param="model",
                )
            raise self._unavailable(
                f"no healthy neuron can host {profile.id!r}: "
                + ("; ".join(self._down_reasons(profile)) or "the neurons that could are down"),
                "no_feasible_neuron",
            )
        if decision is Unplaced.NO_ROOM:
            raise self._unavailable(
                f"no neuron has room for {profile.id!r} ({need} MB) and nothing idle can be "
                "evicted",
                "insufficient_capacity",
            )
        if isinstance(decision, PoolPlan):
            log.info(
                "route pooled",
                extra={
                    "model": profile.id,
                    "node": decision.borrower.neuron,
                    "pool": decision.borrower.pool,
                    "local_mb": decision.borrower.mb,
                    "need_mb": need,
                    "donors": ",".join(f"{d.neuron}:{d.pool}:{d.mb}MB" for d in decision.donors),
                },
            )
            return decision
        log.info(
            "route cold-load",
            extra={
                "model": profile.id,
                "node": decision.neuron,
                "pool": decision.pool,
                "need_mb": need,
                "evict": ",".join(decision.evict) or None,
            },
        )
        return decision

    def _down_reasons(self, profile: ModelProfile) -> list[str]:
        """Why each neuron that could host ``profile`` (its pinned ones, when it has any;
        hardware unknown counts as could) takes no request now."""
        reasons = []
        for state in self.fleet.neurons.values():
            if profile.pinned_on and state.name not in profile.pinned_on:
                continue
            if state.discovery is not None and not feasible(
                profile, view_of(state, self.catalogue)
            ):
                continue
            reason = state.why_unroutable()
            if reason is not None:
                reasons.append(reason)
        return reasons

    def _never_hostable(self, profile: ModelProfile) -> str | None:
        """Why no neuron could ever host the profile, judged on every configured neuron's
        hardware (healthy or not); None while any neuron's hardware is still unknown."""
        states = list(self.fleet.neurons.values())
        if any(s.discovery is None for s in states):
            return None
        return unhostable(profile, [view_of(s, self.catalogue) for s in states])

    async def _need(self, profile: ModelProfile, exclude: frozenset[str]) -> int:
        """MB the load needs: ``vram_mb``, else what a neuron says its files take (asked of
        the neurons placement would consider, in its order, then any other healthy one)."""
        if profile.vram_mb is not None:
            return profile.vram_mb
        views = [
            view_of(s, self.catalogue, self.weights.known_mb)
            for s in self.fleet.neurons.values()
            if s.name not in exclude
        ]
        ranked = [v.name for v in rank_neurons(profile, views)]
        if not ranked:
            return 0  # nowhere to place it: planning says why
        others = [s.name for s in self.fleet.neurons.values() if s.healthy and s.name not in ranked]
        return need_mb(profile, await self.weights.mb(profile, ranked + others, self._ask_size))

    async def _ask_size(self, name: str, profile: ModelProfile) -> ModelSize:
        state = self.fleet.neurons[name]
        return await self.client.size(state, self._spec(state, profile))

    @staticmethod
    def _spec(
        state: NeuronState, profile: ModelProfile, pool: int | None = None
    ) -> dict[str, object]:
        has_gpus = bool(state.discovery and state.discovery.devices)
        return spec_for(profile, has_gpus, pool)

    # -- evictions and pooled loads ----------------------------------------------------------

    async def _evict_and_load(
        self, state: NeuronState, profile: ModelProfile, placement: Placement
    ) -> None:
        for index, victim in enumerate(placement.evict):
            try:
                await self._unload_begun(state, victim)
            except BaseException:
                for rest in placement.evict[index + 1 :]:
                    state.end_unload(rest, done=False)
                raise
            self._evicted(state, victim, profile.id)
        await self.load_on(state, profile, pool=placement.pool, cold=True)

    def _evicted(self, state: NeuronState, victim: str, for_model: str) -> None:
        self.metrics.evictions.labels(victim, state.name).inc()
        log.info(
            "evict",
            extra={
                "model": victim,
                "node": state.name,
                "for": for_model,
                "strategy": self.settings.eviction.strategy,
            },
        )

    def _reserve_pool(self, model_id: str, plan: PoolPlan) -> None:
        """Book every share of a pooled load in its neuron's ledger (a donor's under a key
        of its own: the borrower's other pool may be one of the donors)."""
        borrower = self.fleet.neurons[plan.borrower.neuron]
        borrower.reserve(model_id, plan.borrower.pool, plan.borrower.mb)
        for index, share in enumerate(plan.donors):
            self.fleet.neurons[share.neuron].reserve(
                f"{model_id}#lent{index}", share.pool, share.mb
            )

    def _unreserve_pool(self, model_id: str, plan: PoolPlan, *, landed: bool) -> None:
        """The borrower's share is its model's now (``landed``); a donor's stays booked
        until its next poll shows the loan, or goes at once when the load failed."""
        self.fleet.neurons[plan.borrower.neuron].release(model_id)
        for index, share in enumerate(plan.donors):
            donor = self.fleet.neurons[share.neuron]
            key = f"{model_id}#lent{index}"
            if landed:
                donor.release_after_poll(key)
            else:
                donor.release(key)

    async def _load_pooled(self, state: NeuronState, profile: ModelProfile, plan: PoolPlan) -> None:
        """Donors first (each starts an RPC server admitting the borrower only), then the
        borrower loads the model over its own share and theirs; loans go back on failure."""
        loans = await self.pools.lend(profile, plan)
        remote = [{"endpoint": loan.endpoint, "mb": loan.mb} for loan in loans]
        try:
            await self.load_on(
                state,
                profile,
                pool=plan.borrower.pool,
                cold=True,
                extra={"rpc": remote, "local_mb": plan.borrower.mb},
            )
        except ApiError as exc:
            await asyncio.shield(self.pools.release(loans))
            if exc.status < 500:  # cortex's plan did not work out: retrying may (a new plan)
                raise self._unavailable(exc.message, "load_failed") from exc
            raise
        except BaseException:
            await asyncio.shield(self.pools.release(loans))
            raise
        self.pools.record(profile.id, plan, loans)
        log.info(
            "pool",
            extra={
                "model": profile.id,
                "node": state.name,
                "local_mb": plan.borrower.mb,
                "donors": ",".join(f"{lent.donor}:{lent.mb}MB" for lent in loans),
            },
        )

    # -- loads and unloads on one neuron -------------------------------------------------------

    async def load_on(
        self,
        state: NeuronState,
        profile: ModelProfile,
        *,
        pool: int | None = None,
        cold: bool = False,
        extra: dict[str, object] | None = None,
    ) -> None:
        """Load ``profile`` on ``state``; a load of it already posted there is joined.
        ``extra``: more of the load spec (a pooled load's remote devices)."""
        pending = state.loads.get(profile.id)
        if pending is None:
            pending = asyncio.ensure_future(self._post_load(state, profile, pool, cold, extra))
            state.loads[profile.id] = pending
            pending.add_done_callback(lambda _f: state.loads.pop(profile.id, None))
        await asyncio.shield(pending)

    async def _post_load(
        self,
        state: NeuronState,
        profile: ModelProfile,
        pool: int | None,
        cold: bool,
        extra: dict[str, object] | None = None,
    ) -> None:
        spec = {**self._spec(state, profile, pool), **(extra or {})}
        started = time.monotonic()
        try:
            reply = await self.client.load(state, spec)
        except UpstreamError as exc:
            if not isinstance(exc, LocalExhaustion):
                self.fleet.report_failure(state, exc)
            self.metrics.error(profile.id, state.name, "load_failed")
            raise self._unavailable(
                f"loading {profile.id!r} on {state.name} failed: {exc}", "load_failed"
            ) from exc
        except NeuronRefused as exc:
            self.metrics.error(profile.id, state.name, "load_failed")
            log.warning(
                "load failed",
                extra={
                    "model": profile.id,
                    "node": state.name,
                    "status": exc.status,
                    "error": exc.message,
                },
            )
            retry_after = self.settings.proxy.retry_after_s
            raise load_refused(profile.id, state.name, exc.status, exc.error, retry_after) from exc
        elapsed = time.monotonic() - started
        if reply.model is not None:
            if reply.model.id != profile.id:
                # A local folder spelled otherwise than the neuron's canonical id: cortex
                # would never see it as loaded and would load it again on every request.
                log.warning(
                    "model id not canonical",
                    extra={"model": profile.id, "node": state.name, "canonical": reply.model.id},
                )
                raise ApiError(
                    400,
                    f"neuron {state.name} serves {profile.id!r} as {reply.model.id!r}: name it "
                    f"{reply.model.id!r} in models.toml",
                    code="model_id_not_canonical",
                    param="model",
                )
            state.landed(reply.model)
        if reply.outcome == "loaded":
            self.metrics.load_seconds.labels(profile.id, state.name).observe(elapsed)
            if cold:
                self.metrics.cold_starts.labels(profile.id, state.name).inc()
            log.info(
                "load",
                extra={
                    "model": profile.id,
                    "node": state.name,
                    "secs": round(elapsed, 3),
                    "cold": cold,
                },
            )

    async def unload(self, state: NeuronState, model_id: str) -> None:
        state.begin_unload(model_id)
        await self._unload_begun(state, model_id)

    async def _unload_begun(self, state: NeuronState, model_id: str) -> None:
        """Unload a model already taken off routing (``begin_unload``)."""
        done = False
        try:
            await self.client.unload(state, model_id)
            done = True
        except (UpstreamError, NeuronRefused) as exc:
            raise self._unavailable(
                f"unloading {model_id!r} on {state.name} failed: {exc}", "unload_failed"
            ) from exc
        finally:
            state.end_unload(model_id, done=done)
        self.pools.forget(model_id, state.name)  # a pooled model's donors get it back

    # -- admin commands ----------------------------------------------------------------------

    def neuron(self, node: str) -> NeuronState:
        state = self.fleet.neurons.get(node)
        if state is None:
            raise not_found(f"no neuron named {node!r}", code="neuron_not_found", param="node")
        return state

    async def admin_load_on(self, state: NeuronState, model_id: str) -> None:
        """Load on the neuron the admin named. Shielded with its lock: an admin client that
        leaves must not release the neuron to other loads while this one still runs."""
        profile = self.catalogue.profile(model_id) or ModelProfile(id=model_id)
        await asyncio.shield(asyncio.ensure_future(self._locked_load(state, profile)))

    async def _locked_load(self, state: NeuronState, profile: ModelProfile) -> None:
        async with self._neuron_locks[state.name]:
            await self.load_on(state, profile)

    async def admin_unload(self, model_id: str, node: str | None) -> list[str]:
        targets = [
            s
            for s in self.fleet.neurons.values()
            if (node is None or s.name == node) and model_id in s.models
        ]
        if not targets:
            raise not_found(
                f"model {model_id!r} is not loaded" + (f" on {node}" if node else " anywhere"),
                code="model_not_found",
                param="model_id",
            )
        for state in targets:
            async with self._neuron_locks[state.name]:
                await self.unload(state, model_id)
            log.info("unload", extra={"model": model_id, "node": state.name, "by": "admin"})
        return [s.name for s in targets]

    async def admin_pull(
        self, model_id: str, node: str | None, quant: str | None = None
    ) -> tuple[str, DownloadInfo]:
        """Start downloading a model's weights (the ``quant`` file of a GGUF repo, else the
        catalogue's) on ``node``, else on the neuron a cold load would pick first; returns
        that neuron and the download as it reported it."""
        profile = self.catalogue.profile(model_id)
        if profile is None:
            profile = ModelProfile(id=model_id, quant=quant)  # a quant makes it a GGUF repo
        elif quant is not None:
            if profile.harness != "llamacpp":
                raise ApiError(
                    400,
                    f"{model_id!r} is a {profile.harness} model in the catalogue: it has no "
                    "GGUF files to choose with quant",
                    code="invalid_quant",
                    param="quant",
                )
            profile = profile.model_copy(update={"quant": quant})
        if node is not None:
            state = self.neuron(node)
        else:
            views = [view_of(s, self.catalogue) for s in self.fleet.neurons.values()]
            ranked = rank_neurons(profile, views)
            if not ranked:
                raise self._unavailable(
                    f"no healthy neuron can host {model_id!r} to download it to",
                    "no_feasible_neuron",
                )
            state = self.fleet.neurons[ranked[0].name]
        try:
            download = await self.client.pull(state, self._spec(state, profile))
        except NeuronRefused as exc:
            raise neuron_error(state.name, exc.status, exc.error, f"pulling {model_id!r}") from exc
        except (UpstreamError, ValidationError) as exc:
            raise self._neuron_failed(state, f"pulling {model_id!r}", exc) from exc
        log.info("pull", extra={"model": model_id, "node": state.name, "by": "admin"})
        return state.name, download

    async def admin_delete(self, model_id: str, node: str) -> int:
        state = self.neuron(node)
        try:
            freed = await self.client.delete(state, model_id)
        except NeuronRefused as exc:
            raise neuron_error(node, exc.status, exc.error, f"deleting {model_id!r}") from exc
        except (UpstreamError, ValidationError) as exc:
            raise self._neuron_failed(state, f"deleting {model_id!r}", exc) from exc
        log.info("weights deleted", extra={"model": model_id, "node": node, "by": "admin"})
        return freed

    def _neuron_failed(self, state: NeuronState, doing: str, exc: Exception) -> ApiError:
        """A neuron that could not be reached (503: it may be back soon) or answered
        something that is not its API (502)."""
        if isinstance(exc, ValidationError):
            return ApiError(
                502,
                f"{doing} on {state.name}: the neuron's answer was not understood",
                type="api_error",
                code="bad_neuron_reply",
            )
        return self._unavailable(f"{doing} on {state.name} failed: {exc}", "upstream_unavailable")

    def pin(self, model_id: str, pinned: bool) -> None:
        """Keep a loaded model from eviction (or let it go again), until cortex restarts."""
        if pinned:
            self.pins.add(model_id)
        else:
            self.pins.discard(model_id)
        log.info("pin" if pinned else "unpin", extra={"model": model_id, "by": "admin"})

    # -- defragmentation ----------------------------------------------------------------------

    def _maybe_defrag(self, state: NeuronState) -> None:
        threshold = self.settings.eviction.defrag_after_cycles
        if defrag_due(state.cycles, threshold, state.name in self._defrag_tasks):
            task = asyncio.ensure_future(self.defrag(state))
            self._defrag_tasks[state.name] = task
            task.add_done_callback(lambda _t: self._defrag_tasks.pop(state.name, None))

    async def defrag(self, state: NeuronState) -> None:
        """At a quiet moment, have the neuron recycle its device workers: each process ends
        and a fresh one reloads its models, so every byte the old one kept (allocator
        caches, fragments from the load/unload cycles) goes back to the driver."""
        while state.busy() or self._cold:
            await asyncio.sleep(0.5)
        async with self._neuron_locks[state.name]:
            resident = [m for m, s in state.models.items() if s.status == "loaded"]
            log.info(
                "defrag",
                extra={"node": state.name, "cycles": state.cycles, "models": ",".join(resident)},
            )
            try:
                recycled = await self.client.recycle(state)
            except (UpstreamError, NeuronRefused) as exc:
                log.warning("defrag incomplete", extra={"node": state.name, "error": str(exc)})
                return
            log.info("defrag done", extra={"node": state.name, "recycled": ",".join(recycled)})
            state.cycles = 0

    async def stop(self) -> None:
        for task in list(self._defrag_tasks.values()):
            task.cancel()


async def _try_acquire(lock: asyncio.Lock, patience_s: float = 0.05) -> bool:
    """Take ``lock`` if it is free or about to be (a waiter woken by a release may still
    hold it on 3.11 while ``locked()`` says False); False rather than queue behind a
    long holder."""
    try:
        async with asyncio.timeout(patience_s):
            await lock.acquire()
    except TimeoutError:
        return False
    return True
