"""What both wire APIs share: one pooled HTTP client per endpoint, the model list, and
a POST whose answer comes back as parsed server-sent events, every failure turned into
an ``EndpointError`` the user can read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from helexa.acp.config import EndpointConfig
from helexa.acp.endpoint import (
    EndpointError,
    describe_http_error,
    describe_transport_error,
    fetch_model_ids,
    new_http_client,
)
from helexa.acp.sse import aiter_events

# (event name, parsed data) of one SSE event; (None, payload) for a plain JSON answer.
Event = tuple[str | None, Any]


class HttpEndpoint:
    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self._client: httpx.AsyncClient | None = None

    def headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = new_http_client(self.config)
        return self._client

    async def list_models(self, timeout_s: float) -> list[str]:
        return await fetch_model_ids(self._http(), self.config, self.headers(), timeout_s)

    async def post_events(self, path: str, body: dict[str, Any]) -> AsyncIterator[Event]:
        """POST ``body`` to ``{base_url}{path}`` and yield its events until ``[DONE]`` or the
        end; a server that ignored ``stream`` answers one JSON payload instead."""
        url = f"{self.config.base_url}{path}"
        try:
            async with self._http().stream(
                "POST", url, json=body, headers=self.headers()
            ) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode("utf-8", "replace")
                    raise EndpointError(
                        describe_http_error(self.config, response.status_code, text)
                    )
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    try:
                        yield None, json.loads(await response.aread())
                    except ValueError as exc:
                        raise EndpointError("the endpoint answered neither SSE nor JSON") from exc
                    return
                async for sse in aiter_events(response.aiter_lines()):
                    data = sse.data.strip()
                    if data == "[DONE]":
                        break
                    if not data:
                        continue
                    try:
                        parsed = json.loads(data)
                    except ValueError as exc:
                        raise EndpointError(f"the endpoint sent a bad event: {exc}") from exc
                    yield sse.event, parsed
        except httpx.HTTPError as exc:
            raise EndpointError(describe_transport_error(self.config, exc)) from exc

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
