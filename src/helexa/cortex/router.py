"""Routing (§2.4), cold-loading with single-flight, eviction (§2.5) and defrag."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from helexa.core.errors import ApiError, not_found, unavailable
from helexa.core.wire import ModelSize, ModelStatus
from helexa.cortex.affinity import AffinityTable
from helexa.cortex.catalogue import Catalogue, ModelProfile
from helexa.cortex.config import CortexSettings
from helexa.cortex.fleet import Fleet, NeuronState, view_of
from helexa.cortex.metrics import Metrics
from helexa.cortex.placement import (
    CPU_POOL,
    Placement,
    PoolPlan,
    choose_replica,
    feasible,
    need_mb,
    place,
    plan_pool,
    rank_neurons,
    unhostable,
)
from helexa.cortex.pooling import Pools
from helexa.cortex.upstream import LocalExhaustion, UpstreamError
from helexa.cortex.weights import WeightSizes

log = logging.getLogger("helexa.cortex.router")

SIZE_TIMEOUT_S = 60.0  # /models/size reads file headers: a neuron that takes longer is sick
# A neuron's load answers that retrying cannot change (missing weights, a bad spec, an
# architecture it cannot run, a model bigger than the host): passed on, without Retry-After.
PERMANENT_LOAD_ERRORS = frozenset({400, 403, 404, 413, 422})


class Router:
    def __init__(
        self,
        settings: CortexSettings,
        catalogue: Catalogue,
        fleet: Fleet,
        metrics: Metrics,
        weights: WeightSizes | None = None,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.fleet = fleet
        self.metrics = metrics
        self._cold: dict[str, asyncio.Future[NeuronState]] = {}
        self._placing = asyncio.Lock()
        self.weights = weights or WeightSizes()
        self._neuron_locks: dict[str, asyncio.Lock] = {
            name: asyncio.Lock() for name in fleet.neurons
        }
        self._defrag_tasks: dict[str, asyncio.Task[None]] = {}
        self.pools = Pools(fleet.neurons, self._post)
        self.pins: set[str] = set()  # models pinned at run time (the dashboard): never evicted
        self.affinity: AffinityTable[tuple[str, str], str] = AffinityTable()

    # -- errors ---------------------------------------------------------------------------

    def _unavailable(self, message: str, code: str) -> ApiError:
        return unavailable(message, code=code, retry_after=self.settings.proxy.retry_after_s)

    # -- routing --------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The concrete model id for a client's name: an alias's target; the name itself
        when the catalogue or a neuron knows it; else a matching fallback's target; else
        the name (which then gets its 404)."""
        model_id = self.catalogue.resolve(name)
        if model_id in self.catalogue.models or self._on_any_neuron(model_id):
            return model_id
        return self.catalogue.fallback_for(name) or model_id

    def granting(self, name: str, model_id: str) -> list[str]:
        """The names that led from ``name`` to ``model_id`` (for a key's allowlist): the
        name itself when it is the model or its alias, the fallback pattern that matched."""
        names = [name] if self.catalogue.resolve(name) == model_id else []
        match = self.catalogue.fallback_match(name)
        if match is not None and model_id != name and self.catalogue.resolve(match[1]) == model_id:
            names.append(match[0])
        return names

    def _on_any_neuron(self, model_id: str) -> bool:
        return any(model_id in s.models for s in self.fleet.neurons.values())

    def known(self, model_id: str) -> bool:
        return model_id in self.catalogue.models or self._on_any_neuron(model_id)

    def require_known(self, model_id: str) -> None:
        """The 404 (or 503 when no neuron is up to ask) for a model nothing can serve."""
        if not self.known(model_id):
            raise self._unknown(model_id)

    def _unknown(self, model_id: str) -> ApiError:
        if not any(s.healthy for s in self.fleet.neurons.values()):
            return self._unavailable("no healthy neuron to serve the request", "no_healthy_neuron")
        return not_found(
            f"model {model_id!r} is not in the catalogue and not loaded on any neuron",
            code="model_not_found",
            param="model",
        )

    def replica(
        self,
        model_id: str,
        exclude: frozenset[str] = frozenset(),
        affinity: str | None = None,
    ) -> NeuronState | None:
        """The healthy neuron with the model loaded: the conversation's own while it is
        healthy, else the one with the least in-flight work. A neuron that missed its last
        health check gets new requests only when no other one has it; a draining one gets
        none (it would refuse them: better a cold load elsewhere)."""
        candidates = [
            s
            for s in self.fleet.neurons.values()
            if s.healthy and not s.draining and s.name not in exclude and s.loaded(model_id)
        ]
        states = [s for s in candidates if s.responsive] or candidates
        key = (model_id, affinity) if affinity else None
        preferred = self.affinity.get(key) if key else None
        name = choose_replica([(s.name, s.busy()) for s in states], preferred)
        if name is None:
            return None
        if key is not None and name != preferred:
            self.affinity.remember(key, name)
        return self.fleet.neurons[name]

    async def route(
        self,
        model_id: str,
        exclude: frozenset[str] = frozenset(),
        affinity: str | None = None,
    ) -> NeuronState:
        state = self.replica(model_id, exclude, affinity)
        if state is not None:
            return state
        loading = next(
            (
                s
                for s in self.fleet.neurons.values()
                if s.healthy
                and not s.draining
                and s.name not in exclude
                and model_id in s.models
                and s.models[model_id].status == "loading"
            ),
            None,
        )
        if loading is not None:  # a load in progress there (ours, or a pre-warm): join it
            await self._join_load(loading, model_id)
            return loading
        profile = self.catalogue.profile(model_id)
        if profile is None:
            draining = [
                s.name for s in self.fleet.neurons.values() if s.draining and s.loaded(model_id)
            ]
            if exclude or draining:  # the model exists, only its neurons failed or drain
                why = f" (shutting down: {', '.join(draining)})" if draining else ""
                raise self._unavailable(
                    f"no other neuron serves {model_id!r}{why}", "upstream_unavailable"
                )
            raise self._unknown(model_id)
        # A neuron where the model is poisoned must not be chosen to load it again.
        poisoned = {s.name for s in self.fleet.neurons.values() if model_id in s.models}
        return await self.cold_load(profile, exclude | poisoned)

    async def _join_load(self, state: NeuronState, model_id: str) -> None:
        """Wait for a load already under way on ``state``: cortex's own post is shared (not
        posted or counted again); a neuron's own (pre-warm) is watched through the poller."""
        pending = state.loads.get(model_id)
        if pending is not None:
            await asyncio.shield(pending)
            return
        deadline = time.monotonic() + self.settings.proxy.load_timeout_s
        round_s = 2 * (self.fleet.settings.interval_s + self.fleet.settings.timeout_s)
        while state.healthy and state.status_of(model_id) == "loading":
            if time.monotonic() > deadline:
                break
            pending = state.loads.get(model_id)
            if pending is not None:
                await asyncio.shield(pending)
                return
            await self.fleet.next_round(round_s)
        if not (state.healthy and state.loaded(model_id)):
            raise self._unavailable(
                f"{model_id!r} did not finish loading on {state.name}", "load_failed"
            )

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
                ready = self.replica(profile.id, exclude)
                if ready is not None:
                    return ready
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
        await self._load_on(state, profile, pool=placement.pool, cold=True)

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
            await self._load_on(
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
        status, payload = await self._post(
            state, "/models/size", self._spec(state, profile), SIZE_TIMEOUT_S
        )
        if status != 200:
            raise RuntimeError((payload.get("error") or {}).get("message", f"status {status}"))
        return ModelSize.model_validate(payload)

    # -- lifecycle calls to neurons -------------------------------------------------------------

    async def _post(
        self, state: NeuronState, path: str, body: dict[str, object], timeout: float
    ) -> tuple[int, dict]:
        response = await state.pool.request(
            "POST",
            path,
            orjson.dumps(body),  # the neuron token: a default header of the pool
            connect_timeout=self.settings.proxy.connect_timeout_s,
            header_timeout=timeout,
        )
        try:
            raw = await response.read(timeout)
        finally:
            response.close()
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            payload = {"error": {"message": raw.decode(errors="replace")[:300]}}
        return response.status, payload

    @staticmethod
    def _spec(
        state: NeuronState, profile: ModelProfile, pool: int | None = None
    ) -> dict[str, object]:
        """The ModelSpec a load of ``profile`` on ``state`` sends (and its sizing): with
        the pool placement planned for, so the load lands where the room was made."""
        spec: dict[str, object] = {"model_id": profile.id, "harness": profile.harness}
        if profile.quant:
            spec["quant"] = profile.quant
        if pool == CPU_POOL or (
            pool is None and profile.cpu_ok and not (state.discovery and state.discovery.devices)
        ):
            spec["devices"] = []
        elif pool is not None and profile.min_devices <= 1:
            spec["devices"] = [pool]
        return spec

    async def _load_on(
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
            status, payload = await self._post(
                state, "/models/load", spec, self.settings.proxy.load_timeout_s
            )
        except UpstreamError as exc:
            if not isinstance(exc, LocalExhaustion):
                self.fleet.report_failure(state, exc)
            self.metrics.error(profile.id, state.name, "load_failed")
            raise self._unavailable(
                f"loading {profile.id!r} on {state.name} failed: {exc}", "load_failed"
            ) from exc
        if status != 200:
            error = payload.get("error") or {}
            reason = error.get("message", f"status {status}")
            self.metrics.error(profile.id, state.name, "load_failed")
            log.warning(
                "load failed",
                extra={"model": profile.id, "node": state.name, "status": status, "error": reason},
            )
            message = f"loading {profile.id!r} on {state.name} failed: {reason}"
            if status in PERMANENT_LOAD_ERRORS:  # retrying cannot help: say so, no Retry-After
                raise ApiError(
                    status,
                    message,
                    type=error.get("type") or "invalid_request_error",
                    code=error.get("code") or "load_failed",
                    param="model",
                )
            if error.get("code") == "downloading":  # its weights are on their way there
                raise self._unavailable(
                    f"{profile.id!r} is not on {state.name} yet: {reason}", "downloading"
                )
            raise self._unavailable(message, "load_failed")
        elapsed = time.monotonic() - started
        model = payload.get("model")
        if isinstance(model, dict):
            landed = ModelStatus.model_validate(model)
            if landed.id != profile.id:
                # A local folder spelled otherwise than the neuron's canonical id: cortex
                # would never see it as loaded and would load it again on every request.
                log.warning(
                    "model id not canonical",
                    extra={"model": profile.id, "node": state.name, "canonical": landed.id},
                )
                raise ApiError(
                    400,
                    f"neuron {state.name} serves {profile.id!r} as {landed.id!r}: name it "
                    f"{landed.id!r} in models.toml",
                    code="model_id_not_canonical",
                    param="model",
                )
            state.landed(landed)
        if payload.get("status") == "loaded":
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

    def _plan(
        self, profile: ModelProfile, exclude: frozenset[str], need: int, *, pool: bool = True
    ) -> Placement | PoolPlan:
        views = [
            view_of(s, self.catalogue, self.weights.known_mb, self.pins)
            for s in self.fleet.neurons.values()
            if s.name not in exclude
        ]
        if not rank_neurons(profile, views):
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
        placement = place(profile, views, need, self.settings.eviction.strategy)
        if placement is None:
            # No one neuron has room, even evicting: pool several neurons' memory (GGUF).
            # Any healthy neuron may lend, those excluded as the model's host among them.
            donors = [
                view_of(s, self.catalogue, self.weights.known_mb)
                for s in self.fleet.neurons.values()
            ]
            pooled = plan_pool(profile, views, donors, need) if pool else None
            if pooled is not None:
                log.info(
                    "route pooled",
                    extra={
                        "model": profile.id,
                        "node": pooled.borrower.neuron,
                        "pool": pooled.borrower.pool,
                        "local_mb": pooled.borrower.mb,
                        "need_mb": need,
                        "donors": ",".join(f"{d.neuron}:{d.pool}:{d.mb}MB" for d in pooled.donors),
                    },
                )
                return pooled
            raise self._unavailable(
                f"no neuron has room for {profile.id!r} ({need} MB) and nothing idle can be "
                "evicted",
                "insufficient_capacity",
            )
        log.info(
            "route cold-load",
            extra={
                "model": profile.id,
                "node": placement.neuron,
                "pool": placement.pool,
                "need_mb": need,
                "evict": ",".join(placement.evict) or None,
            },
        )
        return placement

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

    async def unload(self, state: NeuronState, model_id: str) -> None:
        state.begin_unload(model_id)
        await self._unload_begun(state, model_id)

    async def _unload_begun(self, state: NeuronState, model_id: str) -> None:
        """Post the unload of a model already taken off routing (``begin_unload``)."""
        done = False
        try:
            status, payload = await self._post(
                state, "/models/unload", {"model_id": model_id}, self.settings.proxy.load_timeout_s
            )
            if status not in (200, 404):
                reason = (payload.get("error") or {}).get("message", f"status {status}")
                raise self._unavailable(
                    f"unloading {model_id!r} on {state.name} failed: {reason}", "unload_failed"
                )
            done = True
        except UpstreamError as exc:
            raise self._unavailable(
                f"unloading {model_id!r} on {state.name} failed: {exc}", "unload_failed"
            ) from exc
        finally:
            state.end_unload(model_id, done=done)
        self.pools.forget(model_id, state.name)  # a pooled model's donors get it back

    async def admin_load(self, model_id: str, node: str | None) -> NeuronState:
        profile = self.catalogue.profile(model_id) or ModelProfile(id=model_id)
        if node is None:
            return await self.route(model_id)
        state = self.fleet.neurons.get(node)
        if state is None:
            raise not_found(f"no neuron named {node!r}", code="neuron_not_found", param="node")
        # Shielded with its lock: an admin client that leaves must not release the neuron
        # to other loads while this one still runs there.
        await asyncio.shield(asyncio.ensure_future(self._locked_load(state, profile)))
        return state

    async def _locked_load(self, state: NeuronState, profile: ModelProfile) -> None:
        async with self._neuron_locks[state.name]:
            await self._load_on(state, profile)

    # -- weights on the neurons (cortex models pull|ls|rm) -------------------------------------

    def _neuron(self, node: str) -> NeuronState:
        state = self.fleet.neurons.get(node)
        if state is None:
            raise not_found(f"no neuron named {node!r}", code="neuron_not_found", param="node")
        return state

    async def admin_pull(self, model_id: str, node: str | None) -> tuple[str, dict[str, object]]:
        """Start downloading a model's weights on ``node``, else on the neuron a cold load
        would pick first; returns that neuron and the download as it reported it."""
        profile = self.catalogue.profile(model_id) or ModelProfile(id=model_id)
        if node is not None:
            state = self._neuron(node)
        else:
            views = [view_of(s, self.catalogue) for s in self.fleet.neurons.values()]
            ranked = rank_neurons(profile, views)
            if not ranked:
                raise self._unavailable(
                    f"no healthy neuron can host {model_id!r} to download it to",
                    "no_feasible_neuron",
                )
            state = self.fleet.neurons[ranked[0].name]
        status, payload = await self._post(
            state, "/models/pull", self._spec(state, profile), SIZE_TIMEOUT_S
        )
        if status != 200:
            raise self._neuron_error(state, status, payload, f"pulling {model_id!r}")
        log.info("pull", extra={"model": model_id, "node": state.name, "by": "admin"})
        return state.name, payload

    async def admin_delete(self, model_id: str, node: str) -> dict[str, object]:
        state = self._neuron(node)
        status, payload = await self._post(
            state, "/models/delete", {"model_id": model_id}, SIZE_TIMEOUT_S
        )
        if status != 200:
            raise self._neuron_error(state, status, payload, f"deleting {model_id!r}")
        log.info("weights deleted", extra={"model": model_id, "node": node, "by": "admin"})
        return payload

    @staticmethod
    def _neuron_error(
        state: NeuronState, status: int, payload: dict[str, object], doing: str
    ) -> ApiError:
        error = payload.get("error")
        error = error if isinstance(error, dict) else {}
        return ApiError(
            status if status >= 400 else 502,
            f"{doing} on {state.name}: {error.get('message', f'status {status}')}",
            type=str(error.get("type") or "invalid_request_error"),
            code=str(error.get("code") or "neuron_error"),
            param=error.get("param"),  # type: ignore[arg-type]
        )

    def pin(self, model_id: str, pinned: bool) -> None:
        """Keep a loaded model from eviction (or let it go again), until cortex restarts."""
        self.require_known(model_id)
        if pinned:
            self.pins.add(model_id)
        else:
            self.pins.discard(model_id)
        log.info("pin" if pinned else "unpin", extra={"model": model_id, "by": "admin"})

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

    # -- defragmentation ----------------------------------------------------------------------

    def _maybe_defrag(self, state: NeuronState) -> None:
        threshold = self.settings.eviction.defrag_after_cycles
        if threshold and state.cycles >= threshold and state.name not in self._defrag_tasks:
            task = asyncio.ensure_future(self._defrag(state))
            self._defrag_tasks[state.name] = task
            task.add_done_callback(lambda _t: self._defrag_tasks.pop(state.name, None))

    async def _defrag(self, state: NeuronState) -> None:
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
                status, payload = await self._post(
                    state, "/workers/recycle", {}, self.settings.proxy.load_timeout_s
                )
            except UpstreamError as exc:
                log.warning("defrag incomplete", extra={"node": state.name, "error": str(exc)})
                return
            if status != 200:
                error = (payload.get("error") or {}).get("message", f"status {status}")
                log.warning("defrag incomplete", extra={"node": state.name, "error": error})
                return
            log.info(
                "defrag done",
                extra={"node": state.name, "recycled": ",".join(payload.get("recycled", []))},
            )
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
