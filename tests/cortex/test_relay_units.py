"""The relay's own decisions, in process: a translator that raises something other than
an ApiError (a bug) answers a 500 in the client's protocol envelope, logged with its
traceback, never a crash or the wrong protocol's body."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from starlette.types import Message

from helexa.cortex.protocols import AnthropicMessages
from helexa.cortex.record import record_of
from helexa.cortex.relay import Endpoint


class Broken(AnthropicMessages):
    def translate(self, body: dict[str, Any], model_id: str, scope: Any) -> Any:
        raise TypeError("unhashable type: 'list'")


def test_a_translator_bug_is_a_500_in_the_protocols_envelope(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = SimpleNamespace(resolve=lambda name: name, require_known=lambda model_id: None)
    dispatcher = SimpleNamespace(router=router, metrics=None, idle_timeout=1.0)
    endpoint = Endpoint(Broken(), dispatcher, drain=None)  # type: ignore[arg-type]
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/v1/messages",
        "headers": [(b"content-type", b"application/json")],
    }
    body = orjson.dumps({"model": "m", "max_tokens": 1, "messages": []})
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    with caplog.at_level(logging.ERROR, logger="helexa.cortex.proxy"):
        asyncio.run(endpoint(scope, receive, send))
    assert sent[0]["status"] == 500
    answer = orjson.loads(sent[1]["body"])
    assert answer["type"] == "error" and answer["error"]["type"] == "api_error"
    assert (
        "TypeError" in answer["error"]["message"] and "unhashable" not in answer["error"]["message"]
    )
    assert record_of(scope).error == "internal_error"
    assert any(r.exc_info for r in caplog.records if r.message == "request translation failed")


def test_which_neuron_503s_send_a_request_to_another_neuron() -> None:
    from helexa.cortex.dispatch import elsewhere

    def body(code: str) -> bytes:
        return b'{"error":{"message":"x","type":"service_unavailable","code":"%s"}}' % code.encode()

    assert elsewhere(body("shutting_down")) == "draining"
    assert elsewhere(body("engine_crashed")) == "engine_crashed"
    assert elsewhere(body("model_reloading")) == "engine_crashed"
    assert elsewhere(body("queue_full")) is None  # the client's answer: not retried
    assert elsewhere(b"") is None
