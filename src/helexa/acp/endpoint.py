"""The model endpoint seam: one streaming call per round, as wire-neutral events.

Two wire APIs implement it (``openai_chat``, ``anthropic_messages``); the agent loop only
sees their events, the stream vocabulary of ``helexa.core.stream``, with ``Finish.reason``
normalised across wire APIs to "stop" | "length" | "tool_calls" | "refusal". Every
failure to talk to the endpoint becomes an ``EndpointError`` whose message is meant for
the user, never a hang or a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from helexa.acp.config import EndpointConfig
from helexa.core.stream import StreamEvent


class EndpointError(Exception):
    """The endpoint could not serve the round; ``str()`` is what the user is shown."""


class Endpoint(Protocol):
    config: EndpointConfig

    def stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        model: str,
        max_tokens: int,
    ) -> AsyncIterator[StreamEvent]: ...

    async def list_models(self, timeout_s: float) -> list[str]: ...

    async def aclose(self) -> None: ...


def describe_http_error(config: EndpointConfig, status: int, body: str) -> str:
    """What to tell the user about a non-2xx answer (pure)."""
    where = f"endpoint {config.name!r} ({config.base_url})"
    detail = _error_detail(body)
    if status in (401, 403):
        hint = (
            f"set {config.api_key_env}" if config.api_key_env else "set HELEXA_ACP_API_KEY"
        ) + " to a valid key"
        return f"{where} refused the request ({status}): {detail or 'unauthorized'}; {hint}."
    if status == 404:
        return f"{where} answered 404: {detail or 'not found'} (is the model served there?)."
    if status >= 500:
        return f"{where} failed ({status}): {detail or 'server error'}."
    return f"{where} rejected the request ({status}): {detail or 'no detail'}."


def _error_detail(body: str) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:300]
    if isinstance(error, str):
        return error[:300]
    if isinstance(payload, dict) and "detail" in payload:
        return str(payload["detail"])[:300]
    return body.strip()[:300]


def describe_transport_error(config: EndpointConfig, exc: Exception) -> str:
    where = f"endpoint {config.name!r} at {config.base_url}"
    if isinstance(exc, httpx.ConnectError):
        return f"Cannot reach {where}: {exc or 'connection refused'}. Is cortex running?"
    if isinstance(exc, httpx.TimeoutException):
        return f"{where} timed out ({type(exc).__name__})."
    return f"Lost the connection to {where}: {type(exc).__name__}: {exc}"


def new_http_client(config: EndpointConfig) -> httpx.AsyncClient:
    timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
    return httpx.AsyncClient(timeout=timeout)


async def fetch_model_ids(
    client: httpx.AsyncClient, config: EndpointConfig, headers: dict[str, str], timeout_s: float
) -> list[str]:
    """``GET {base_url}/models`` ids; EndpointError when it cannot be had."""
    try:
        response = await client.get(f"{config.base_url}/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise EndpointError(describe_transport_error(config, exc)) from exc
    if response.status_code != 200:
        raise EndpointError(describe_http_error(config, response.status_code, response.text))
    try:
        data = response.json().get("data") or []
        return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]
    except (ValueError, AttributeError) as exc:
        raise EndpointError(f"endpoint {config.name!r}: /models is not a model list") from exc


@dataclass
class ModelCache:
    """The model picker's list per endpoint, kept a minute so sessions open fast."""

    ttl_s: float = 60.0
    _entries: dict[str, tuple[float, list[str]]] = field(default_factory=dict)

    def get(self, name: str) -> list[str] | None:
        entry = self._entries.get(name)
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return None
        return entry[1]

    def put(self, name: str, ids: list[str]) -> None:
        self._entries[name] = (time.monotonic(), ids)
