"""Eviction through a real cortex and neuron (budget: two 60 MB profiles), plus a ghost
neuron that never answers. Tests run in file order against one shared pair."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.cortex.conftest import Fleet
from tests.cortex.test_fleet import MSGS, client, metric, models
from tests.support.fleet import start_cortex


def loaded(fleet: Fleet) -> set[str]:
    return {m for m, entry in models(fleet).items() if entry["loaded"]}


def ask(fleet: Fleet, model: str) -> None:
    client(fleet).chat.completions.create(model=model, messages=MSGS, max_tokens=2)


def test_health_degraded_while_a_neuron_is_down(solo: Fleet) -> None:
    health = httpx.get(f"{solo.base}/health").json()
    assert (health["status"], health["nodes"]) == ("degraded", {"healthy": 1, "total": 2})
    assert health["view"]["stale"] is False and health["view"]["age_s"] < 30


def test_model_pinned_to_a_dead_neuron_is_503(solo: Fleet) -> None:
    response = httpx.post(
        f"{solo.base}/v1/chat/completions", json={"model": "helexa/haunted", "messages": MSGS}
    )
    assert response.status_code == 503
    assert response.headers["retry-after"].isdigit()
    error = response.json()["error"]
    assert error["code"] == "no_feasible_neuron"
    # The neuron that could host it is named, with since when and why it is down.
    assert "neuron ghost down since " in error["message"], error
    assert error["message"].endswith(": connection refused"), error
    assert "solo" not in error["message"]
    anthropic_shape = httpx.post(
        f"{solo.base}/v1/messages",
        json={"model": "helexa/haunted", "max_tokens": 4, "messages": MSGS},
    )
    assert anthropic_shape.status_code == 503 and anthropic_shape.headers["retry-after"]
    assert anthropic_shape.json()["error"]["type"] == "overloaded_error"


def test_lru_eviction_when_the_budget_is_full(solo: Fleet) -> None:
    ask(solo, "helexa/tiny-a")
    ask(solo, "helexa/tiny-b")
    assert loaded(solo) == {"helexa/tiny-a", "helexa/tiny-b"}
    ask(solo, "helexa/tiny-b")  # a is now least recently used
    ask(solo, "helexa/tiny-c")
    assert loaded(solo) == {"helexa/tiny-b", "helexa/tiny-c"}
    assert metric(solo, "cortex_evictions_total", model="helexa/tiny-a") == 1
    assert "msg=evict model=helexa/tiny-a node=solo for=helexa/tiny-c" in solo.cortex.log()


def test_busy_models_are_never_evicted(solo: Fleet) -> None:
    started = [threading.Event(), threading.Event()]
    finished: list[str] = []

    def stream(model: str, flag: threading.Event) -> None:
        body = {
            "model": model,
            "messages": MSGS,
            "max_tokens": 1200,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream(
            "POST", f"{solo.base}/v1/chat/completions", json=body, timeout=180
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    flag.set()
                    last = line
        finished.append(last)

    threads = [
        threading.Thread(target=stream, args=(m, f))
        for m, f in zip(("helexa/tiny-b", "helexa/tiny-c"), started, strict=True)
    ]
    for thread in threads:
        thread.start()
    assert all(flag.wait(30) for flag in started)
    with pytest.raises(openai.APIStatusError) as info:
        ask(solo, "helexa/tiny-a")
    assert info.value.status_code == 503
    assert info.value.body["code"] == "insufficient_capacity"
    for thread in threads:
        thread.join(180)  # a loaded shared machine: slow, not stuck
    assert finished == ["data: [DONE]", "data: [DONE]"]  # both streams were left alone
    assert loaded(solo) == {"helexa/tiny-b", "helexa/tiny-c"}


def test_pinned_model_survives_eviction(solo: Fleet) -> None:
    ask(solo, "helexa/tiny-p")  # evicts one of b/c
    survivor = (loaded(solo) - {"helexa/tiny-p"}).pop()
    ask(solo, survivor)  # p is now the least recently used, but pinned here
    ask(solo, "helexa/tiny-a")
    assert loaded(solo) == {"helexa/tiny-p", "helexa/tiny-a"}
    assert metric(solo, "cortex_evictions_total", model=survivor) >= 1


def test_model_unloaded_behind_cortexs_back_is_rerouted(solo: Fleet, tmp_path: Path) -> None:
    """A cortex that polls rarely still believes the model is there; the neuron's 404 is
    a routing miss (load it again), never a 404 for the client."""
    neuron_url = solo.neurons["solo"][1]
    slow, base, _ = start_cortex(
        tmp_path,
        {"solo": neuron_url},
        '[[models]]\nid = "helexa/tiny-a"\nmin_devices = 0\n',
        poll_interval_s=60,
    )
    try:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        sdk.chat.completions.create(model="helexa/tiny-a", messages=MSGS, max_tokens=2)
        assert (
            httpx.post(
                f"{neuron_url}/models/unload", json={"model_id": "helexa/tiny-a"}
            ).status_code
            == 200
        )
        answer = sdk.chat.completions.create(model="helexa/tiny-a", messages=MSGS, max_tokens=2)
        assert answer.usage.completion_tokens >= 1
        assert 'msg="stale route" model=helexa/tiny-a node=solo' in slow.log()
    finally:
        slow.stop()


def test_gguf_profiles_without_vram_mb_are_sized_by_the_neuron(
    hf_cache: Path, tmp_path: Path
) -> None:
    """No vram_mb: cortex asks the neuron (POST /models/size), which answers file + KV; room
    for the second GGUF is made by evicting the first (each ~65 MB in a 100 MB budget), where
    an unknown size would send a load the neuron must refuse."""
    from helexa.up.tiny_model import DEMO_SHAPE, write_tiny_model_to_hf_cache
    from tests.support.procs import start_neuron

    repos = ["helexa/sized-a-GGUF", "helexa/sized-b-GGUF"]
    for repo in repos:
        write_tiny_model_to_hf_cache(hf_cache, repo, gguf_only=True, **DEMO_SHAPE)
    neuron, url = start_neuron(
        tmp_path,
        "[cpu]\nmemory_mb = 100\n[harness.llamacpp]\ncontext_tokens = 131072\nslots = 1\n",
        hf_cache=hf_cache,
        name="sized-neuron",
    )
    catalogue = "".join(f'[[models]]\nid = "{r}"\nquant = "Q8_0"\nmin_devices = 0\n' for r in repos)
    cortex, base, _ = start_cortex(tmp_path, {"sized": url}, catalogue, name="sized-cortex")
    try:
        size = httpx.post(f"{url}/models/size", json={"model_id": repos[0], "quant": "Q8_0"})
        expected = size.json()
        assert expected["kv_bytes"] == 131072 * 2 * 128 * 2  # one layer, one KV head of 128
        need = -(-expected["bytes"] // (1024 * 1024))
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        for repo in repos:
            sdk.chat.completions.create(model=repo, messages=MSGS, max_tokens=2)
        log = cortex.log()
        assert f'msg="model sized" model={repos[0]} quant=Q8_0 node=sized mb={need}' in log
        assert f"need_mb={need} evict={repos[0]}" in log
        loaded_now = {m["id"] for m in httpx.get(f"{url}/models").json()}
        assert loaded_now == {repos[1]}
    finally:
        cortex.stop()
        neuron.stop()
