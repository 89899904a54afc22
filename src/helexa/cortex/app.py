"""cortex's HTTP API (§2.7)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from pydantic import AfterValidator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from helexa.core.browser import BrowserGuard, host_names
from helexa.core.errors import anthropic_body, not_found
from helexa.core.http import (
    JSONResponse,
    openai_app,
    read_body,
)
from helexa.core.wire import ModelName, Wire, check_quant
from helexa.cortex.access import AccessLog
from helexa.cortex.activity import WINDOW_S, RecentRequests, per_model
from helexa.cortex.auth import Guard, may_use, visible
from helexa.cortex.config import CortexConfig, split_listen
from helexa.cortex.dispatch import Dispatcher
from helexa.cortex.drain import Drain
from helexa.cortex.fleet import Fleet, NeuronState, view_of
from helexa.cortex.keys import KeyStore, keys_path
from helexa.cortex.loads import Loads
from helexa.cortex.metrics import Metrics
from helexa.cortex.metrics_port import MetricsPort
from helexa.cortex.neuron_client import HttpNeuronClient
from helexa.cortex.placement import feasible
from helexa.cortex.protocols import (
    AnthropicCountTokens,
    AnthropicMessages,
    OpenAIPassthrough,
    OpenAIResponses,
)
from helexa.cortex.record import record_of
from helexa.cortex.relay import ClientProtocol, Endpoint
from helexa.cortex.router import Router
from helexa.cortex.ui import DASHBOARD_HTML

log = logging.getLogger("helexa.cortex")


class AdminModelRequest(Wire):
    model_id: ModelName  # 400 for NUL, glob characters, '..', over 255 characters
    node: str | None = None


class PullRequest(AdminModelRequest):
    quant: Annotated[str | None, AfterValidator(check_quant)] = None  # else the catalogue's


class PinRequest(AdminModelRequest):
    pinned: bool = True


class DeleteRequest(Wire):
    model_id: ModelName
    node: str  # weights are deleted on one neuron at a time, named


class Gateway:
    """Everything one cortex process holds."""

    def __init__(self, config: CortexConfig) -> None:
        self.config = config
        self.started = int(time.time())
        self.metrics = Metrics(key_names=config.settings.gateway.metrics_key_names)
        metrics_host, _port = split_listen(config.settings.gateway.metrics_listen)
        self.metrics_port = MetricsPort(
            self.metrics.registry,
            timeout_s=config.settings.limits.header_timeout_s,
            hosts=host_names(metrics_host, config.settings.http.allowed_hosts),
        )
        self.fleet = Fleet(
            config.settings.neurons,
            config.settings.poller,
            on_round=self._after_poll,
            token=config.settings.neuron_token or config.settings.admin_token,
        )
        self.keys = KeyStore(
            keys_path(config.settings.auth.keys_file, config.path), config.settings.auth.api_key
        )
        proxy = config.settings.proxy
        client = HttpNeuronClient(
            connect_timeout_s=proxy.connect_timeout_s, load_timeout_s=proxy.load_timeout_s
        )
        self.loads = Loads(config.settings, config.catalogue, self.fleet, self.metrics, client)
        self.router = Router(config.settings, config.catalogue, self.fleet, self.loads)
        self.recent = RecentRequests()  # the dashboard's recent requests and their figures
        self.drain = Drain(config.settings.gateway.drain_timeout_s)  # cortex's own SIGTERM

    def _after_poll(self) -> None:
        self.metrics.refresh(self.fleet)
        self.loads.pools.sweep()  # loans of pooled models their borrower has dropped

    def model_entries(self) -> list[dict[str, Any]]:
        catalogue = self.config.catalogue
        ids = list(catalogue.models)
        for state in self.fleet.neurons.values():
            ids += [m for m in state.models if m not in catalogue.models and m not in ids]
        entries: dict[str, dict[str, Any]] = {}
        for model_id in ids:
            locations = [
                {
                    "node": s.name,
                    "status": s.models[model_id].status,
                    "vram_used_mb": s.models[model_id].vram_used_mb,
                    # a pooled model: its share here, and the donors lending it the rest
                    "pool": self.loads.pools.split_of(model_id, s.name),
                }
                for s in self.fleet.neurons.values()
                if model_id in s.models
            ]
            profile = catalogue.profile(model_id)
            feasible_on = [
                s.name
                for s in self.fleet.neurons.values()
                if s.discovery is not None
                and profile is not None
                and feasible(profile, view_of(s, catalogue))
            ]
            entries[model_id] = {
                "id": model_id,
                "object": "model",
                "created": self.started,
                "owned_by": model_id.split("/", 1)[0] if "/" in model_id else "helexa",
                "loaded": any(loc["status"] == "loaded" for loc in locations),
                "feasible_on": feasible_on,
                "locations": locations,
            }
        for alias, target in catalogue.aliases.items():
            entries[alias] = {**entries[target], "id": alias, "alias_of": target}
        for pattern, target in catalogue.fallbacks:
            # Listed so that the mapping is visible; the id is a pattern, not a model name.
            entries[pattern] = {**entries[target], "id": pattern, "fallback_for": target}
        return list(entries.values())

    def model_entry(self, name: str) -> dict[str, Any] | None:
        """The entry for one name: a model, an alias, or a name a fallback maps."""
        entries = {e["id"]: e for e in self.model_entries()}
        if name in entries and "fallback_for" not in entries[name]:
            return entries[name]
        model_id = self.router.resolve(name)
        if model_id == name or model_id not in entries:
            return None
        return {**entries[model_id], "id": name, "alias_of": model_id}

    def health(self) -> dict[str, Any]:
        total = len(self.fleet.neurons)
        healthy = self.fleet.healthy_count()
        stale = self.fleet.stale()
        age = self.fleet.view_age_s()
        return {
            "status": "ok" if total and healthy == total and not stale else "degraded",
            "nodes": {"healthy": healthy, "total": total},
            # How old cortex's picture of the fleet is: stale means the poller is stuck.
            "view": {"age_s": None if age is None else round(age, 3), "stale": stale},
        }

    def fleet_view(self) -> dict[str, Any]:
        neurons = []
        for s in self.fleet.neurons.values():
            health = s.health
            neurons.append(
                {
                    "name": s.name,
                    "endpoint": s.endpoint,
                    "healthy": s.healthy,
                    "devices": [d.model_dump() for d in s.discovery.devices] if s.discovery else [],
                    "device_health": [d.model_dump() for d in health.devices] if health else [],
                    "cpu": health.cpu.model_dump() if health else None,
                    "loans": [loan.model_dump() for loan in health.loans] if health else [],
                    "models": [m.model_dump() for m in s.models.values()],
                    "in_flight": s.busy(),
                }
            )
        return {**self.health(), "neurons": neurons, "models": self.model_entries()}

    async def stored(self) -> dict[str, Any]:
        """Where each model's weights are: every healthy neuron's ``/models/stored``."""
        states = [s for s in self.fleet.neurons.values() if s.healthy]

        async def ask(state: NeuronState) -> Any:
            try:
                stored = await self.loads.client.stored(state)
            except Exception as exc:  # an old neuron, a timeout: say so for that one
                return {"error": str(exc) or type(exc).__name__}
            return [entry.model_dump(mode="json") for entry in stored]

        answers = await asyncio.gather(*(ask(s) for s in states))
        return {state.name: answer for state, answer in zip(states, answers, strict=True)}

    def dashboard(self) -> dict[str, Any]:
        """What the dashboard shows, in one answer: the fleet view, each neuron's state and
        devices with what uses their memory, the models with their figures of the last
        minutes, and the recent requests and errors."""
        now = time.time()
        view = self.fleet_view()
        for entry, state in zip(view["neurons"], self.fleet.neurons.values(), strict=True):
            entry.update(neuron_panel(state, now))
        stats = per_model(self.recent.items(), now)
        for entry in view["models"]:
            entry["pinned"] = entry["id"] in self.loads.pins
            entry["last_minutes"] = stats.get(entry.get("alias_of") or entry["id"])
        return {
            **view,
            "now": now,
            "window_s": WINDOW_S,
            "recent": [r.as_json() for r in self.recent.last(50)],
            "errors": [r.as_json() for r in self.recent.errors(20)],
        }


def neuron_panel(state: NeuronState, now: float) -> dict[str, Any]:
    """One neuron as the dashboard draws it: up, down or draining, since when it answered,
    and each memory pool (GPUs, the CPU budget) with the models and loans in it."""
    health = state.health
    if not state.healthy:
        shown = "down"
    elif state.draining:
        shown = "draining"
    else:
        shown = "up" if state.responsive else "unresponsive"
    loads = {m: i for m, i in (health.models.items() if health else [])}
    pools: list[dict[str, Any]] = []
    readings = {d.index: d for d in health.devices} if health else {}
    for device in state.discovery.devices if state.discovery else []:
        reading = readings.get(device.index)
        pools.append(
            {
                "pool": f"cuda:{device.index}",
                "name": device.name,
                "total_mb": device.vram_total_mb,
                "free_mb": reading.vram_free_mb if reading else None,
                "lent_mb": reading.lent_mb if reading else 0,
                "models": [],
            }
        )
    if health is not None:
        cpu = health.cpu
        pools.append(
            {
                "pool": "cpu",
                "name": "CPU budget",
                "total_mb": cpu.memory_used_mb + cpu.memory_free_mb + cpu.lent_mb,
                "free_mb": cpu.memory_free_mb,
                "lent_mb": cpu.lent_mb,
                "models": [],
            }
        )
    by_pool = {p["pool"]: p for p in pools}
    models = []
    for status in state.models.values():
        info = loads.get(status.id)
        keys = [f"cuda:{i}" for i in status.devices] or ["cpu"]
        for key in keys:
            if key in by_pool:
                by_pool[key]["models"].append(
                    {"id": status.id, "mb": status.vram_used_mb // len(keys)}
                )
        models.append(
            {
                "id": status.id,
                "status": status.status,
                "mb": status.vram_used_mb,
                "in_flight": info.in_flight if info else 0,
                "queued": info.queued if info else 0,
                "error": status.error,
            }
        )
    return {
        "state": shown,
        "last_poll_s": None if state.polled_at is None else round(now - state.polled_at, 1),
        "last_error": state.last_error or None,
        "pools": pools,
        "loaded": models,
        "activation": health.activation.model_dump() if health else None,
        "workers": [w.model_dump() for w in health.workers] if health else [],
        "downloads": [d.model_dump() for d in health.downloads] if health else [],
    }


def anthropic_model(entry: dict[str, Any], created: int) -> dict[str, Any]:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    return {"type": "model", "id": entry["id"], "display_name": entry["id"], "created_at": stamp}


def wants_anthropic(request: Request) -> bool:
    return "anthropic-version" in request.headers


def build_app(gateway: Gateway) -> ASGIApp:
    settings = gateway.config.settings

    async def models(request: Request) -> Response:
        entries = visible(gateway.model_entries(), record_of(request.scope).models)
        if wants_anthropic(request):
            data = [anthropic_model(e, gateway.started) for e in entries]
            return JSONResponse(
                {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                }
            )
        return JSONResponse({"object": "list", "data": entries})

    async def model(request: Request) -> Response:
        name = request.path_params["model_id"]
        entry = gateway.model_entry(name)
        anthropic_shape = wants_anthropic(request)
        keys_models = record_of(request.scope).models  # the API key's allowlist
        model_id = gateway.router.resolve(name)
        # Outside the key's allowlist (judged as a request for it would be): as if it did
        # not exist, as OpenAI answers for models a key cannot access.
        allowed = may_use(keys_models, model_id, gateway.router.granting(name, model_id))
        if entry is None or not allowed:
            error = not_found(f"model {name!r} does not exist", code="model_not_found")
            body = anthropic_body(error) if anthropic_shape else error.openai_body()
            return JSONResponse(body, status_code=error.status)
        if anthropic_shape:
            return JSONResponse(anthropic_model(entry, gateway.started))
        return JSONResponse(entry)

    async def health(_request: Request) -> Response:
        return JSONResponse(gateway.health())

    async def fleet(_request: Request) -> Response:
        return JSONResponse(gateway.fleet_view())

    async def dashboard_page(_request: Request) -> Response:
        return Response(DASHBOARD_HTML, media_type="text/html; charset=utf-8")

    async def dashboard(_request: Request) -> Response:
        return JSONResponse(gateway.dashboard())

    async def admin_pull(request: Request) -> Response:
        body = await read_body(request, PullRequest)
        node, download = await gateway.loads.admin_pull(body.model_id, body.node, body.quant)
        return JSONResponse({"node": node, "download": download.model_dump(mode="json")})

    async def admin_delete(request: Request) -> Response:
        body = await read_body(request, DeleteRequest)
        freed = await gateway.loads.admin_delete(body.model_id, body.node)
        return JSONResponse({"status": "deleted", "freed_bytes": freed})

    async def admin_stored(_request: Request) -> Response:
        return JSONResponse(await gateway.stored())

    async def admin_pin(request: Request) -> Response:
        body = await read_body(request, PinRequest)
        model_id = gateway.router.resolve(body.model_id)
        gateway.router.require_known(model_id)
        gateway.loads.pin(model_id, body.pinned)
        return JSONResponse({"status": "pinned" if body.pinned else "unpinned"})

    async def admin_load(request: Request) -> Response:
        body = await read_body(request, AdminModelRequest)  # the admin token: cortex.auth
        state = await gateway.router.admin_load(body.model_id, body.node)
        return JSONResponse({"status": "loaded", "node": state.name})

    async def admin_unload(request: Request) -> Response:
        body = await read_body(request, AdminModelRequest)
        nodes = await gateway.loads.admin_unload(body.model_id, body.node)
        return JSONResponse({"status": "unloaded", "nodes": nodes})

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await gateway.fleet.poll_all()  # a first picture before serving
        gateway.metrics.refresh(gateway.fleet)
        gateway.fleet.start()
        await gateway.metrics_port.start()  # bound by ``cortex serve`` before this
        try:
            yield
        finally:
            await gateway.metrics_port.close()
            await gateway.loads.stop()
            await gateway.fleet.stop()

    dispatcher = Dispatcher(gateway.router, gateway.fleet, gateway.metrics)
    hosted = settings.compat.hosted_tools
    protocols: dict[str, ClientProtocol] = {
        "/v1/chat/completions": OpenAIPassthrough("/v1/chat/completions"),
        "/v1/completions": OpenAIPassthrough("/v1/completions"),
        "/v1/messages": AnthropicMessages(hosted),
        "/v1/messages/count_tokens": AnthropicCountTokens(hosted),
        "/v1/responses": OpenAIResponses(hosted),
    }
    hot: dict[str, ASGIApp] = {
        path: Endpoint(protocol, dispatcher, gateway.drain) for path, protocol in protocols.items()
    }
    routes = [
        *(Route(path, handler, methods=["POST"]) for path, handler in hot.items()),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", health, methods=["GET"]),
        Route("/admin/fleet", fleet, methods=["GET"]),
        Route("/admin/dashboard", dashboard, methods=["GET"]),
        Route("/admin/models/pin", admin_pin, methods=["POST"]),
        Route("/admin/models/pull", admin_pull, methods=["POST"]),
        Route("/admin/models/delete", admin_delete, methods=["POST"]),
        Route("/admin/models/stored", admin_stored, methods=["GET"]),
        Route("/ui", dashboard_page, methods=["GET"]),
        Route("/admin/models/load", admin_load, methods=["POST"]),
        Route("/admin/models/unload", admin_unload, methods=["POST"]),
    ]

    def model_label(model_id: str | None) -> str:
        # Client-chosen names must not become label values: unknown ones share one.
        return model_id if model_id and gateway.router.known(model_id) else "unknown"

    guard = Guard(gateway.keys, settings.admin_token)
    if settings.admin_token and not settings.neuron_token:
        log.warning(
            "neuron_token is not set: the admin token is sent to every neuron in its place; "
            "set a separate neuron_token so a neuron host cannot learn cortex's admin token"
        )
    if not gateway.keys.enabled:
        log.warning(
            "no API keys configured: the API is open to anyone who can reach it "
            "(set [auth] keys_file and run `cortex keys add`)",
            extra={"admin": "guarded" if settings.admin_token else "open"},
        )
    listen_host, _port = split_listen(settings.gateway.listen)
    return AccessLog(
        openai_app(routes, lifespan),
        hot,
        gateway.metrics,
        model_label,
        None if guard.off else guard,  # nothing configured: nothing to check per request
        BrowserGuard(listen_host, settings.http),
        gateway.recent,
    )
