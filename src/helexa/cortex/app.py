"""cortex's HTTP API (§2.7)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helexa.core.errors import ApiError
from helexa.core.http import (
    JSONResponse,
    openai_app,
    read_body,
)
from helexa.core.placement import feasible
from helexa.core.wire import Wire
from helexa.cortex.config import CortexConfig
from helexa.cortex.dispatch import Dispatcher
from helexa.cortex.fleet import Fleet, view_of
from helexa.cortex.messages import CountTokens, MessagesProxy
from helexa.cortex.metrics import Metrics
from helexa.cortex.proxy import OpenAIProxy, send_json
from helexa.cortex.router import Router

log = logging.getLogger("helexa.cortex")


class AdminModelRequest(Wire):
    model_id: str = Field(min_length=1)
    node: str | None = None


class Gateway:
    """Everything one cortex process holds."""

    def __init__(self, config: CortexConfig) -> None:
        self.config = config
        self.started = int(time.time())
        self.metrics = Metrics()
        self.fleet = Fleet(
            config.settings.neurons,
            config.settings.poller,
            on_round=lambda: self.metrics.refresh(self.fleet),
        )
        self.router = Router(config.settings, config.catalogue, self.fleet, self.metrics)

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
        return list(entries.values())

    def health(self) -> dict[str, Any]:
        total = len(self.fleet.neurons)
        healthy = self.fleet.healthy_count()
        return {
            "status": "ok" if total and healthy == total else "degraded",
            "nodes": {"healthy": healthy, "total": total},
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
                    "models": [m.model_dump() for m in s.models.values()],
                    "in_flight": s.busy(),
                }
            )
        return {**self.health(), "neurons": neurons, "models": self.model_entries()}


def build_app(gateway: Gateway) -> ASGIApp:
    settings = gateway.config.settings

    async def models(_request: Request) -> Response:
        return JSONResponse({"object": "list", "data": gateway.model_entries()})

    async def health(_request: Request) -> Response:
        return JSONResponse(gateway.health())

    async def fleet(_request: Request) -> Response:
        return JSONResponse(gateway.fleet_view())

    def require_admin(request: Request) -> None:
        token = settings.admin_token
        if token and request.headers.get("authorization") != f"Bearer {token}":
            raise ApiError(
                401,
                "a valid admin token is required",
                type="authentication_error",
                code="unauthorized",
            )

    async def admin_load(request: Request) -> Response:
        require_admin(request)
        body = await read_body(request, AdminModelRequest)
        state = await gateway.router.admin_load(body.model_id, body.node)
        return JSONResponse({"status": "loaded", "node": state.name})

    async def admin_unload(request: Request) -> Response:
        require_admin(request)
        body = await read_body(request, AdminModelRequest)
        nodes = await gateway.router.admin_unload(body.model_id, body.node)
        return JSONResponse({"status": "unloaded", "nodes": nodes})

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await gateway.fleet.poll_all()  # a first picture before serving
        gateway.metrics.refresh(gateway.fleet)
        gateway.fleet.start()
        try:
            yield
        finally:
            await gateway.router.stop()
            await gateway.fleet.stop()

    dispatcher = Dispatcher(gateway.router, gateway.fleet, gateway.metrics)
    hot: dict[str, ASGIApp] = {
        "/v1/chat/completions": OpenAIProxy("/v1/chat/completions", dispatcher),
        "/v1/completions": OpenAIProxy("/v1/completions", dispatcher),
        "/v1/messages": MessagesProxy(dispatcher),
        "/v1/messages/count_tokens": CountTokens(dispatcher),
    }
    routes = [
        *(Route(path, handler, methods=["POST"]) for path, handler in hot.items()),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", health, methods=["GET"]),
        Route("/admin/fleet", fleet, methods=["GET"]),
        Route("/admin/models/load", admin_load, methods=["POST"]),
        Route("/admin/models/unload", admin_unload, methods=["POST"]),
    ]
    return FastPath(openai_app(routes, lifespan), hot)


class FastPath:
    """POSTs to the proxy routes go straight to their handlers; everything else (other
    routes, 404/405, lifespan) through Starlette. Saves the middleware and router walk
    on every proxied request: a measurable share of cortex's added latency."""

    def __init__(self, app: ASGIApp, hot: dict[str, ASGIApp]) -> None:
        self.app = app
        self.hot = hot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.hot.get(scope.get("path", "")) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await handler(scope, receive, tracking_send)
        except Exception as exc:  # a bug, not an API error: still an envelope, if we can
            log.error(
                "unhandled error", extra={"path": scope["path"], "error": repr(exc)}, exc_info=exc
            )
            if not started:
                error = ApiError(
                    500,
                    f"internal error: {type(exc).__name__}: {exc}",
                    type="server_error",
                    code="internal_error",
                )
                await send_json(send, 500, orjson.dumps(error.openai_body()))
