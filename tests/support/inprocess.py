"""A neuron in this process behind an ASGI client: for tests that patch engine internals
(fault injection), which a neuron subprocess would not see."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from helexa.core.settings import load_settings
from helexa.core.wire import ModelSpec
from helexa.neuron.app import build_app
from helexa.neuron.config import NeuronSettings
from helexa.neuron.service import Neuron

Scenario = Callable[[Neuron, httpx.AsyncClient], Awaitable[None]]

# The engines in this process (``[workers] isolate = false``), where a test can patch them.
IN_PROCESS = {"isolate": False}


def run_neuron(settings: dict[str, Any], model_id: str | None, scenario: Scenario) -> None:
    """Start a neuron with ``settings``, load ``model_id`` (None: nothing), run
    ``scenario``, stop."""
    parsed = load_settings(NeuronSettings, None, {"workers": IN_PROCESS, **settings})

    async def main() -> None:
        neuron = Neuron(parsed)
        neuron.start()
        try:
            if model_id is not None:
                await neuron.load(ModelSpec(model_id=model_id))
            transport = httpx.ASGITransport(app=build_app(neuron))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", timeout=60
            ) as client:
                await scenario(neuron, client)
        finally:
            await neuron.stop()

    asyncio.run(main())


def sse_frames(raw: str) -> list[str]:
    """The ``data:`` payloads of a server-sent-events body, in order."""
    return [b.removeprefix("data: ") for b in raw.split("\n\n") if b.startswith("data")]
