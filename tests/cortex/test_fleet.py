"""A real cortex in front of three real neurons, driven with the openai SDK and raw HTTP.

Tests run in file order against one shared fleet; the last one kills a neuron."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import time

import httpx
import openai
import pytest

from tests.cortex.conftest import Fleet
from tests.support.procs import console_script

MSGS = [{"role": "user", "content": "Tell me about the weather in the city."}]


def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.base}/v1", api_key="unused", max_retries=0)


def models(fleet: Fleet) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{fleet.base}/v1/models").json()["data"]}


def load_count(fleet: Fleet, model: str) -> int:
    return len(re.findall(rf"msg=load model_id={re.escape(model)} ", fleet.neuron_logs()))


def metric(fleet: Fleet, name: str, **labels: str) -> float:
    text = httpx.get(f"{fleet.metrics}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def broken_lines(log: str, model: str) -> list[str]:
    """Access-log lines of streams that began (200) and broke."""
    return [
        line
        for line in log.splitlines()
        if "msg=request" in line and f"model={model} " in line and "outcome=broken" in line
    ]


def test_catalogue_topology_and_aliases(fleet: Fleet) -> None:
    listing = httpx.get(f"{fleet.base}/v1/models").json()
    assert listing["object"] == "list"
    entries = {m["id"]: m for m in listing["data"]}
    a = entries["helexa/tiny-a"]
    assert a["object"] == "model" and a["owned_by"] == "helexa" and isinstance(a["created"], int)
    assert a["loaded"] is False and a["locations"] == []
    assert a["feasible_on"] == ["n1", "n2", "n3"]
    assert entries["helexa/tiny-p"]["feasible_on"] == ["n3"]
    assert entries["helexa/gpu-only"]["feasible_on"] == []  # CPU-only fleet
    alias = entries["helexa/fast"]
    assert alias["alias_of"] == "helexa/tiny-a"
    assert {k: v for k, v in alias.items() if k not in ("id", "alias_of")} == {
        k: v for k, v in a.items() if k != "id"
    }


def test_a_model_no_neuron_can_ever_host_is_a_400_that_says_why(fleet: Fleet) -> None:
    """A GPU-only profile on a CPU-only fleet: permanent, so a 400 (no Retry-After that
    would have clients retry forever) naming the reason and the fix."""
    with pytest.raises(openai.BadRequestError) as info:
        client(fleet).chat.completions.create(model="helexa/gpu-only", messages=MSGS)
    assert "retry-after" not in info.value.response.headers
    assert info.value.body["code"] == "model_unservable"
    message = info.value.body["message"]
    assert "n1: CPU only" in message and "min_devices = 0" in message
    anthropic_answer = httpx.post(
        f"{fleet.base}/v1/messages",
        json={"model": "helexa/gpu-only", "max_tokens": 4, "messages": MSGS},
    )
    assert anthropic_answer.status_code == 400
    assert anthropic_answer.json()["error"]["type"] == "invalid_request_error"


def test_missing_weights_are_a_404_that_says_what_to_do_not_a_retry(fleet: Fleet) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(fleet).chat.completions.create(model="helexa/missing", messages=MSGS)
    assert "retry-after" not in info.value.response.headers
    assert info.value.body["code"] == "model_weights_not_found"
    assert "download" in info.value.body["message"]
    assert "/tmp" not in info.value.body["message"]  # no server paths


def test_single_flight_cold_load_under_20_concurrent_requests(fleet: Fleet) -> None:
    sdk = client(fleet)

    def ask(_i: int) -> str:
        answer = sdk.chat.completions.create(model="helexa/tiny-b", messages=MSGS, max_tokens=4)
        return answer.model

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answered = list(pool.map(ask, range(20)))
    assert answered == ["helexa/tiny-b"] * 20
    assert load_count(fleet, "helexa/tiny-b") == 1
    assert metric(fleet, "cortex_cold_starts_total", model="helexa/tiny-b") == 1
    where = [loc["node"] for loc in models(fleet)["helexa/tiny-b"]["locations"]]
    assert len(where) == 1


def test_alias_routes_to_the_concrete_model_and_loaded_first(fleet: Fleet) -> None:
    sdk = client(fleet)
    answer = sdk.chat.completions.create(model="helexa/fast", messages=MSGS, max_tokens=3)
    assert answer.model == "helexa/tiny-a"
    for _ in range(4):
        sdk.chat.completions.create(model="helexa/tiny-a", messages=MSGS, max_tokens=2)
    assert load_count(fleet, "helexa/tiny-a") == 1  # later requests found it loaded
    listing = models(fleet)
    assert listing["helexa/tiny-a"]["loaded"] is True
    assert listing["helexa/fast"]["locations"] == listing["helexa/tiny-a"]["locations"]
    # Cold loads spread by free memory: a and b landed on different neurons.
    assert (
        listing["helexa/tiny-a"]["locations"][0]["node"]
        != listing["helexa/tiny-b"]["locations"][0]["node"]
    )


def test_pinned_model_loads_on_its_neuron(fleet: Fleet) -> None:
    client(fleet).chat.completions.create(model="helexa/tiny-p", messages=MSGS, max_tokens=2)
    assert [loc["node"] for loc in models(fleet)["helexa/tiny-p"]["locations"]] == ["n3"]


def test_streaming_passthrough_and_usage(fleet: Fleet) -> None:
    sdk = client(fleet)
    with_usage = list(
        sdk.chat.completions.create(
            model="helexa/tiny-a",
            messages=MSGS,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[0].choices[0].delta.role == "assistant"
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens >= 1
    without = list(
        sdk.chat.completions.create(model="helexa/tiny-a", messages=MSGS, max_tokens=6, stream=True)
    )
    assert all(c.usage is None for c in without)  # cortex asked for it, the client did not
    assert [c for c in without if c.choices and c.choices[0].finish_reason]


def test_seeded_answers_match_direct_neuron(fleet: Fleet) -> None:
    node = models(fleet)["helexa/tiny-a"]["locations"][0]["node"]
    direct = openai.OpenAI(base_url=f"{fleet.neurons[node][1]}/v1", api_key="x")
    args = {"model": "helexa/tiny-a", "messages": MSGS, "max_tokens": 12, "seed": 9}
    through = client(fleet).chat.completions.create(**args).choices[0].message.content
    assert through == direct.chat.completions.create(**args).choices[0].message.content


def test_legacy_completions_end_to_end(fleet: Fleet) -> None:
    sdk = client(fleet)
    whole = sdk.completions.create(
        model="helexa/tiny-a", prompt="The weather", max_tokens=5, seed=2
    )
    assert whole.object == "text_completion" and whole.usage.completion_tokens >= 1
    streamed = sdk.completions.create(
        model="helexa/tiny-a", prompt="The weather", max_tokens=5, seed=2, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    return error


def test_malformed_bodies_and_unknown_models(fleet: Fleet) -> None:
    url = f"{fleet.base}/v1/chat/completions"
    assert envelope(httpx.post(url, content=b"{nope"), 400)["code"] == "invalid_json"
    assert envelope(httpx.post(url, content=b'"text"'), 400)["code"] == "invalid_json"
    assert envelope(httpx.post(url, json={"messages": MSGS}), 400)["param"] == "model"
    assert envelope(httpx.post(url, json={"model": 5, "messages": MSGS}), 400)["param"] == "model"
    bad = envelope(httpx.post(url, json={"model": "helexa/tiny-a", "messages": "hi"}), 400)
    assert bad["param"] == "messages"  # the neuron's validation, passed through
    assert (
        envelope(httpx.post(url, json={"model": "nobody/nothing", "messages": MSGS}), 404)["code"]
        == "model_not_found"
    )
    envelope(httpx.get(f"{fleet.base}/v2/nothing"), 404)
    envelope(httpx.get(url), 405)


def test_client_disconnect_cancels_the_neuron_generation(fleet: Fleet) -> None:
    before = fleet.neuron_logs().count("generation cancelled")
    body = {
        "model": "helexa/tiny-a",
        "messages": MSGS,
        "max_tokens": 1900,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{fleet.base}/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.monotonic() + 10
    while fleet.neuron_logs().count("generation cancelled") == before:
        assert time.monotonic() < deadline, "the neuron kept generating"
        time.sleep(0.05)


def test_non_streaming_client_that_leaves_cancels_upstream(fleet: Fleet) -> None:
    before = fleet.neuron_logs().count("generation cancelled")
    body = {"model": "helexa/tiny-a", "messages": MSGS, "max_tokens": 1900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{fleet.base}/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while fleet.neuron_logs().count("generation cancelled") == before:
        assert time.monotonic() < deadline, "the neuron kept generating for nobody"
        time.sleep(0.05)


def test_metrics_are_scraped(fleet: Fleet) -> None:
    assert metric(fleet, "cortex_requests_total", model="helexa/tiny-a") >= 8
    assert metric(fleet, "cortex_prompt_tokens_total", model="helexa/tiny-a") > 0
    assert metric(fleet, "cortex_completion_tokens_total", model="helexa/tiny-a") > 0
    text = httpx.get(f"{fleet.metrics}/metrics").text
    assert re.search(
        r'cortex_time_to_first_token_seconds_bucket\{le="0.05",model="helexa/tiny-a"', text
    )
    assert re.search(
        r'cortex_request_duration_seconds_bucket\{le="\+Inf",model="helexa/tiny-b"', text
    )
    assert metric(fleet, "cortex_tokens_per_second_count", model="helexa/tiny-a") >= 1
    assert metric(fleet, "cortex_model_load_seconds_count", model="helexa/tiny-b") == 1
    for node in ("n1", "n2", "n3"):
        assert metric(fleet, "cortex_neuron_up", node=node) == 1
    assert metric(fleet, "cortex_model_loaded", model="helexa/tiny-a") == 1
    # The neurons' prefix caches, from their /health (the next poll round at the latest).
    assert metric(fleet, "cortex_prefix_cache_capacity_tokens", model="helexa/tiny-a") > 0
    deadline = time.monotonic() + 10
    while not (
        metric(fleet, "cortex_prefix_cache_hits", model="helexa/tiny-a")
        + metric(fleet, "cortex_prefix_cache_misses", model="helexa/tiny-a")
    ):
        assert time.monotonic() < deadline, "no prefix-cache counts from the neuron"
        time.sleep(0.1)
    assert metric(fleet, "cortex_batch_peak_sequences", model="helexa/tiny-a") >= 1
    assert metric(fleet, "cortex_request_errors_total", model="helexa/gpu-only") >= 1
    assert metric(fleet, "cortex_request_errors_total", model="unknown") >= 1
    assert 'model="nobody/nothing"' not in text  # client-chosen names are not labels


def test_status_cli(fleet: Fleet) -> None:
    result = subprocess.run(
        [console_script("cortex"), "status", "--endpoint", fleet.base, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["status"] == "ok" and status["nodes"] == {"healthy": 3, "total": 3}
    assert {n["name"] for n in status["neurons"]} == {"n1", "n2", "n3"}
    table = subprocess.run(
        [console_script("cortex"), "status", "--endpoint", fleet.base],
        capture_output=True,
        text=True,
        timeout=30,
        env={"COLUMNS": "160"},
    )
    assert table.returncode == 0 and "helexa/tiny-a" in table.stdout and "n3" in table.stdout


def test_neuron_killed_mid_stream(fleet: Fleet) -> None:
    """An error event (not a silent end), failover to another neuron, /health degraded."""
    loaded = httpx.post(
        f"{fleet.base}/admin/models/load",
        json={"model_id": "helexa/tiny-k", "node": "n2"},
        timeout=60,
    )
    assert loaded.json() == {"status": "loaded", "node": "n2"}
    body = {
        "model": "helexa/tiny-k",
        "messages": MSGS,
        "max_tokens": 1900,
        "temperature": 0,
        "stream": True,
    }
    events: list[str] = []
    with httpx.stream(
        "POST", f"{fleet.base}/v1/chat/completions", json=body, timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    fleet.neurons["n2"][0].signal(signal.SIGKILL)
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert error["code"] in {"upstream_broken", "upstream_timeout"} and "n2" in error["message"]
    # The broken stream (a 200 that ended in an error) is logged and counted as one.
    deadline = time.monotonic() + 10
    while not (broken := broken_lines(fleet.cortex.log(), "helexa/tiny-k")):
        assert time.monotonic() < deadline, "no access-log line says the stream broke"
        time.sleep(0.05)
    assert "node=n2" in broken[-1] and f"error={error['code']}" in broken[-1], broken[-1]
    counted = metric(
        fleet, "cortex_request_errors_total", model="helexa/tiny-k", node="n2", reason=error["code"]
    )
    assert counted == 1
    # Failover: the model is cold-loaded on a surviving neuron.
    answer = client(fleet).chat.completions.create(
        model="helexa/tiny-k", messages=MSGS, max_tokens=3
    )
    assert answer.usage.completion_tokens >= 1
    deadline = time.monotonic() + 10
    while True:  # n2's models disappear once the debounced poller marks it down
        nodes = {loc["node"] for loc in models(fleet)["helexa/tiny-k"]["locations"]}
        if nodes and "n2" not in nodes:
            break
        assert time.monotonic() < deadline, nodes
        time.sleep(0.1)
    while httpx.get(f"{fleet.base}/health").json()["status"] != "degraded":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.get(f"{fleet.base}/health").json()["nodes"] == {"healthy": 2, "total": 3}
    deadline = time.monotonic() + 5
    while metric(fleet, "cortex_neuron_up", node="n2") != 0:  # gauges refresh per poll round
        assert time.monotonic() < deadline
        time.sleep(0.1)
