"""Client mistakes through cortex are 400s in the route's own envelope, never a 502 or a
silently ignored field: a ``stream`` that is not a boolean, a ``tool_choice`` the tools cannot
meet (OpenAI chat, Anthropic messages)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.cortex.conftest import Fleet, _start_neurons, cpu_models
from tests.cortex.test_fleet import MSGS, client
from tests.support.fleet import start_cortex


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, fleet_cache: Path) -> Iterator[Fleet]:
    """Its own small fleet: the shared one's tests count on what they loaded themselves."""
    work = tmp_path_factory.mktemp("mistakes")
    neurons = _start_neurons(work, fleet_cache, {"m1": "[cpu]\nmemory_mb = 200\n"})
    cortex, base, metrics = start_cortex(
        work, {n: u for n, (_d, u) in neurons.items()}, cpu_models("helexa/tiny-a")
    )
    yield Fleet(cortex, base, metrics, neurons)
    cortex.stop()
    for daemon, _url in neurons.values():
        daemon.stop()


TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize("stream", [1, "true", 0, "no"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_flag_that_is_not_a_boolean_is_a_400(fleet: Fleet, path: str, stream: Any) -> None:
    body: dict[str, Any] = {"model": "helexa/tiny-a", "max_tokens": 2, "stream": stream}
    body.update({"prompt": "Hello"} if path == "/v1/completions" else {"messages": MSGS})
    response = httpx.post(f"{fleet.base}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "stream" and "true or false" in error["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/messages"])
def test_a_null_stream_flag_means_no_stream(fleet: Fleet, path: str) -> None:
    body: dict[str, Any] = {"model": "helexa/tiny-a", "max_tokens": 2, "stream": None}
    body.update({"prompt": "Hello"} if path == "/v1/completions" else {"messages": MSGS})
    response = httpx.post(f"{fleet.base}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")


def test_anthropic_stream_flag_that_is_not_a_boolean_is_a_400(fleet: Fleet) -> None:
    body = {"model": "helexa/tiny-a", "max_tokens": 2, "messages": MSGS, "stream": "yes"}
    response = httpx.post(f"{fleet.base}/v1/messages", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("choice", "says"),
    [
        ({"type": "function", "function": {"name": "launch_rockets"}}, "'launch_rockets'"),
        ("sometimes", "must be 'none', 'auto', 'required'"),
    ],
)
def test_a_tool_choice_the_tools_cannot_meet_is_a_400(fleet: Fleet, choice: Any, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(fleet).chat.completions.create(
            model="helexa/tiny-a", messages=MSGS, max_tokens=2, tools=[TOOL], tool_choice=choice
        )
    assert says in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client(fleet).chat.completions.create(
            model="helexa/tiny-a", messages=MSGS, max_tokens=2, tool_choice="required"
        )
    assert "'required' needs tools" in info.value.message


def test_anthropic_tool_choice_naming_a_missing_tool_is_a_400(fleet: Fleet) -> None:
    sdk = anthropic.Anthropic(base_url=fleet.base, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        sdk.messages.create(
            model="helexa/tiny-a",
            max_tokens=2,
            messages=MSGS,
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
            tool_choice={"type": "tool", "name": "launch_rockets"},
        )
    assert "launch_rockets" in str(info.value)
