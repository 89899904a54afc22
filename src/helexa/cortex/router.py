"""Routing (§2.4): a client's name to a model, a request to a neuron serving it; a model
loaded nowhere goes to the load owner (``loads.Loads``) for a cold load."""

from __future__ import annotations

import asyncio
import time

from helexa.core.errors import ApiError, not_found, unavailable
from helexa.cortex import names
from helexa.cortex.affinity import AffinityTable
from helexa.cortex.catalogue import Catalogue
from helexa.cortex.config import CortexSettings
from helexa.cortex.fleet import Fleet, NeuronState
from helexa.cortex.loads import Loads
from helexa.cortex.placement import choose_replica


class Router:
    def __init__(
        self, settings: CortexSettings, catalogue: Catalogue, fleet: Fleet, loads: Loads
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.fleet = fleet
        self.loads = loads
        self.affinity: AffinityTable[tuple[str, str], str] = AffinityTable()

    def _unavailable(self, message: str, code: str) -> ApiError:
        return unavailable(message, code=code, retry_after=self.settings.proxy.retry_after_s)

    # -- names ------------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        return names.resolve(self.catalogue, name, self._on_any_neuron)

    def granting(self, name: str, model_id: str) -> list[str]:
        return names.granting(self.catalogue, name, model_id)

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

    # -- requests to neurons ------------------------------------------------------------------

    def replica(
        self,
        model_id: str,
        exclude: frozenset[str] = frozenset(),
        affinity: str | None = None,
    ) -> NeuronState | None:
        """The neuron serving the model to send a request to: the conversation's own while
        it serves, else the one with the least in-flight work (``Fleet.serving``)."""
        states = self.fleet.serving(model_id, exclude)
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
        return await self.loads.cold_load(profile, exclude | poisoned)

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

    async def admin_load(self, model_id: str, node: str | None) -> NeuronState:
        """An admin's load: on ``node``, else where a cold load would put it."""
        if node is None:
            return await self.route(model_id)
        state = self.loads.neuron(node)
        await self.loads.admin_load_on(state, model_id)
        return state
