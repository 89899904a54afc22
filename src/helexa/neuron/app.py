"""The neuron's HTTP API (§1.4): every error in the OpenAI envelope."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from helexa.core.auth import TokenGuard
from helexa.core.browser import BrowserGuard, BrowserMiddleware
from helexa.core.errors import ApiError, not_found, unavailable
from helexa.core.http import (
    REQUEST_ID_HEADER,
    JSONResponse,
    openai_app,
    read_body,
)
from helexa.core.wire import (
    ChatCompletionRequest,
    CompletionRequest,
    LendRequest,
    ModelSpec,
    RecycleRequest,
    RecycleResult,
    ReleaseRequest,
    TokenizeRequest,
    UnloadRequest,
)
from helexa.neuron.access import AccessLog, record_of
from helexa.neuron.harness.base import Harness, PreparedPrompt
from helexa.neuron.inference import respond
from helexa.neuron.requests import Requests, Running, request_id_of
from helexa.neuron.service import Neuron


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json")


Answer = Callable[[Request, Running], Awaitable[ASGIApp]]


def build_app(neuron: Neuron) -> Starlette:
    settings = neuron.settings
    running_requests = Requests()  # cancellable by the id cortex sent (helexa.neuron.requests)

    async def discovery(_request: Request) -> Response:
        return JSONResponse(_dump(neuron.hardware.discovery(sorted(neuron.harnesses))))

    async def health(_request: Request) -> Response:
        return JSONResponse(_dump(neuron.health()))

    async def models(_request: Request) -> Response:
        return JSONResponse([_dump(m) for m in neuron.models()])

    async def openai_models(_request: Request) -> Response:
        data = [
            {"id": m.id, "object": "model", "created": 0, "owned_by": "helexa"}
            for m in neuron.models()
            if m.status == "loaded"
        ]
        return JSONResponse({"object": "list", "data": data})

    async def load(request: Request) -> Response:
        spec = await read_body(request, ModelSpec)
        outcome, status = await neuron.load(spec)
        return JSONResponse({"status": outcome, "model": _dump(status)})

    async def pull(request: Request) -> Response:
        spec = await read_body(request, ModelSpec)
        return JSONResponse(_dump(await neuron.pull(spec)))

    async def stored(_request: Request) -> Response:
        return JSONResponse([_dump(m) for m in await neuron.stored()])

    async def delete(request: Request) -> Response:
        body = await read_body(request, UnloadRequest)  # {model_id}
        freed = await neuron.delete(body.model_id)
        return JSONResponse({"status": "deleted", "freed_bytes": freed})

    async def size(request: Request) -> Response:
        spec = await read_body(request, ModelSpec)
        return JSONResponse(_dump(await neuron.size(spec)))

    async def unload(request: Request) -> Response:
        body = await read_body(request, UnloadRequest)
        await neuron.unload(body.model_id)
        return JSONResponse({"status": "unloaded"})

    async def recycle(request: Request) -> Response:
        body = await read_body(request, RecycleRequest)
        recycled = await neuron.recycle(body.device)
        return JSONResponse(_dump(RecycleResult(recycled=recycled)))

    async def lend(request: Request) -> Response:
        body = await read_body(request, LendRequest)
        if neuron.draining:  # its loans end with it: lend elsewhere
            raise unavailable("the neuron is shutting down", code="shutting_down", retry_after=5)
        return JSONResponse(_dump(await neuron.lender.lend(body)))

    async def release(request: Request) -> Response:
        body = await read_body(request, ReleaseRequest)
        return JSONResponse(_dump(await neuron.lender.release(body.loan_id)))

    async def endpoint(request: Request) -> Response:
        model_id = neuron.model_id(request.path_params["model_id"])
        if not any(m.id == model_id for m in neuron.models()):
            raise not_found(
                f"model {model_id!r} is not on this neuron",
                code="model_not_found",
                param="model_id",
            )
        return JSONResponse({"url": f"{str(request.base_url).rstrip('/')}/v1"})

    async def answer(
        request: Request,
        running: Running,
        harness: Harness,
        body: ChatCompletionRequest | CompletionRequest,
        prompt: PreparedPrompt,
    ) -> ASGIApp:
        return await respond(
            harness=harness,
            gate=neuron.admission(body.model),
            body=body,
            prompt=prompt,
            keepalive_s=settings.keepalive_s,
            receive=request.receive,
            running=running,
        )

    def inference(handler: Answer) -> Callable[[Request], Awaitable[ASGIApp]]:
        """An inference route: cancellable by its request id from before its body is read
        (a cancel that comes early stops it as it starts) until its answer is over."""

        async def route(request: Request) -> ASGIApp:
            request_id = request_id_of(request.headers.get(REQUEST_ID_HEADER))
            running = running_requests.open(request_id, record_of(request.scope))
            try:
                return await handler(request, running)
            except BaseException:
                running.end()
                raise

        return route

    async def cancel(request: Request) -> Response:
        request_id = request.path_params["request_id"]
        if not running_requests.cancel(request_id):
            raise not_found(
                f"no request {request_id!r} is running on this neuron", code="request_not_found"
            )
        return Response(status_code=204)

    @inference
    async def chat_completions(request: Request, running: Running) -> ASGIApp:
        body = await read_body(request, ChatCompletionRequest)
        body.model = neuron.model_id(body.model)  # one id per local folder, however spelled
        harness = neuron.harness_of(body.model)
        tools = None if body.tool_choice == "none" else body.tools
        prompt = await harness.prepare_chat(
            body.model, body.messages, tools, body.chat_template_kwargs
        )
        return await answer(request, running, harness, body, prompt)

    @inference
    async def completions(request: Request, running: Running) -> ASGIApp:
        body = await read_body(request, CompletionRequest)
        body.model = neuron.model_id(body.model)
        harness = neuron.harness_of(body.model)
        try:
            text = body.prompt_text()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt", code="invalid_request") from None
        prompt = await harness.prepare_text(body.model, text)
        return await answer(request, running, harness, body, prompt)

    async def tokenize(request: Request) -> Response:
        body = await read_body(request, TokenizeRequest)
        body.model = neuron.model_id(body.model)
        harness = neuron.harness_of(body.model)
        if body.messages:
            prompt = await harness.prepare_chat(
                body.model, body.messages, body.tools, body.chat_template_kwargs
            )
        elif body.prompt is not None:
            prompt = await harness.prepare_text(body.model, body.prompt)
        else:
            raise ApiError(
                400, "give either messages or prompt", param="messages", code="invalid_request"
            )
        return JSONResponse({"count": len(prompt.token_ids)})

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        neuron.start()
        try:
            yield
        finally:
            neuron.begin_drain()
            await neuron.stop_prewarm()
            await neuron.unload_all()
            await neuron.stop()

    routes = [
        Route("/discovery", discovery, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/models/load", load, methods=["POST"]),
        Route("/models/unload", unload, methods=["POST"]),
        Route("/models/size", size, methods=["POST"]),
        Route("/models/pull", pull, methods=["POST"]),
        Route("/models/stored", stored, methods=["GET"]),
        Route("/models/delete", delete, methods=["POST"]),
        Route("/workers/recycle", recycle, methods=["POST"]),
        Route("/rpc/lend", lend, methods=["POST"]),
        Route("/rpc/release", release, methods=["POST"]),
        Route("/models/{model_id:path}/endpoint", endpoint, methods=["GET"]),
        Route("/v1/models", openai_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/requests/{request_id}/cancel", cancel, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
    ]
    app = openai_app(routes, lifespan)
    if settings.token:  # every route but /health (core.auth); inside the access log
        app.add_middleware(TokenGuard, token=settings.token)
    # Host and Origin (core.browser): outside the token check, so that CORS preflights
    # (which carry no credentials) of configured origins are answered.
    app.add_middleware(BrowserMiddleware, guard=BrowserGuard(settings.host, settings.http))
    app.add_middleware(AccessLog)  # one line per request (helexa.neuron.access)
    return app
