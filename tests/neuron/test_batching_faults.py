"""The transformers engine under pressure, in-process: a KV cache too small for every request
at once (wait, then run; or a 503 past the wait limit), NaN logits failing only the requests
they hit, and a failed request's blocks freed at once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from helexa.neuron.harness.engine import StepChunk
from helexa.neuron.harness.transformers.batched import PagedBackend
from helexa.neuron.service import Neuron
from tests.conftest import LOCAL_MODEL
from tests.support.inprocess import Scenario, run_neuron, sse_frames

# The tiny model's KV is 4 KiB a token: 1 MiB holds 256 positions (16 blocks of 16).
SMALL_KV = {"kv_cache_mb": 1, "max_sequences": 4}
LONG = "the weather in the city " * 18  # ~145 prompt tokens
OTHER = "rain and wind over the sea " * 12  # ~125


def body(content: str, max_tokens: int, *, stream: bool = False, seed: int = 1) -> dict:
    return {
        "model": LOCAL_MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.9,
        "seed": seed,
        "stream": stream,
    }


def run(
    model_dir: Path,
    scenario: Scenario,
    *,
    transformers: dict | None = None,
    wait_s: float = 30.0,
) -> None:
    settings = {
        "model_dirs": [model_dir],
        "keepalive_s": 0.05,
        "harnesses": [{"name": "transformers"}],
        "harness": {"transformers": transformers or {}},
        "admission": {"max_concurrent": 4, "queue_timeout_s": wait_s},
    }
    run_neuron(settings, LOCAL_MODEL, scenario)


async def running_stream(
    neuron: Neuron, client: httpx.AsyncClient, request: dict
) -> asyncio.Task[list[str]]:
    """Start a stream and return once it holds KV: more than 100 positions, comfortably
    inside the ~150-token prompt, so the prompt has been read."""

    async def consume() -> list[str]:
        return sse_frames((await client.post("/v1/chat/completions", json=request)).text)

    task = asyncio.create_task(consume())
    while True:
        cache = neuron.health().models[LOCAL_MODEL].prefix_cache
        assert cache is not None
        if cache.running_tokens > 100:
            return task
        await asyncio.sleep(0.002)


def text_of(data: list[str]) -> str:
    assert data[-1] == "[DONE]", data[-1]
    chunks = [json.loads(d) for d in data[:-1]]
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


def test_a_full_kv_cache_makes_a_request_wait_then_run(model_dir: Path) -> None:
    async def scenario(neuron: Neuron, client: httpx.AsyncClient) -> None:
        first_alone = await client.post("/v1/chat/completions", json=body(LONG, 90))
        other_alone = await client.post("/v1/chat/completions", json=body(OTHER, 10, seed=2))
        used = first_alone.json()["usage"]
        assert used["prompt_tokens"] + 90 <= 256  # the first fits alone...
        # ...but not beside the other, whose prompt needs room the first one holds.
        assert used["prompt_tokens"] + other_alone.json()["usage"]["prompt_tokens"] > 256
        first = await running_stream(neuron, client, body(LONG, 90, stream=True))
        other = await client.post("/v1/chat/completions", json=body(OTHER, 10, seed=2))
        assert other.status_code == 200, other.text
        assert other.json()["choices"] == other_alone.json()["choices"]
        assert text_of(await first) == first_alone.json()["choices"][0]["message"]["content"]
        batch = neuron.health().models[LOCAL_MODEL].batch
        assert batch is not None and batch.preempted >= 1 and batch.kv_wait_timeouts == 0

    run(model_dir, scenario, transformers=SMALL_KV)


def test_waiting_past_the_limit_for_kv_room_is_a_503(model_dir: Path) -> None:
    async def scenario(neuron: Neuron, client: httpx.AsyncClient) -> None:
        first = await running_stream(neuron, client, body(LONG, 90, stream=True))
        other = await client.post("/v1/chat/completions", json=body(OTHER, 10))
        assert other.status_code == 503, other.text
        assert other.headers["retry-after"]
        assert other.json()["error"]["code"] == "kv_cache_full"
        assert text_of(await first)  # the running request was not disturbed
        health = neuron.health().models[LOCAL_MODEL]
        assert health.batch is not None and health.batch.kv_wait_timeouts == 1
        again = await client.post("/v1/chat/completions", json=body(OTHER, 10))
        assert again.status_code == 200  # room again once the first one ended

    run(model_dir, scenario, transformers=SMALL_KV, wait_s=0.001)


def test_nan_logits_fail_only_the_requests_they_hit(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poisoned_slot: dict[str, int | None] = {"slot": None}
    original = PagedBackend._forward

    def forward(self: PagedBackend, chunks: list[StepChunk]) -> torch.Tensor:
        logits = original(self, chunks).clone()  # an inference tensor: not writable
        wanting = [c for c in chunks if c.logits]
        for row, chunk in enumerate(wanting):
            if chunk.slot == poisoned_slot["slot"] and chunk.start > 40:
                logits[row] = float("nan")
        return logits

    monkeypatch.setattr(PagedBackend, "_forward", forward)

    async def scenario(neuron: Neuron, client: httpx.AsyncClient) -> None:
        healthy = await running_stream(neuron, client, body(LONG, 60, stream=True))
        poisoned_slot["slot"] = 1  # the next request's slot: the first holds slot 0
        hit = sse_frames(
            (
                await client.post(
                    "/v1/chat/completions", json=body("short", 40, stream=True, seed=3)
                )
            ).text
        )
        assert json.loads(hit[-1])["error"]["code"] == "nan_logits", hit[-1]
        assert text_of(await healthy)  # same batch, finite logits: it carried on
        assert neuron.engines.pool.worker("cpu").poisoned is None
        cache = neuron.health().models[LOCAL_MODEL].prefix_cache
        assert cache is not None and cache.running_tokens == 0
        # The failed request's blocks were freed at once, not retained as a prefix.
        assert cache.cached_tokens < 150 + 60 + 16

    run(model_dir, scenario)


def test_repeated_nan_steps_poison_the_device(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = PagedBackend._forward

    def forward(self: PagedBackend, chunks: list[StepChunk]) -> torch.Tensor:
        return torch.full_like(original(self, chunks), float("nan"))

    async def scenario(neuron: Neuron, client: httpx.AsyncClient) -> None:
        monkeypatch.setattr(PagedBackend, "_forward", forward)
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body(f"q{i}", 20)) for i in range(3))
        )
        codes = {r.json()["error"]["code"] for r in replies}
        assert codes <= {"nan_logits", "device_poisoned"}
        for _ in range(3):  # each NaN step fails its requests; the third in a row poisons
            if neuron.engines.pool.worker("cpu").poisoned is not None:
                break
            await client.post("/v1/chat/completions", json=body("again", 5))
        assert neuron.engines.pool.worker("cpu").poisoned is not None

    run(model_dir, scenario)


def test_sequential_decoding_for_models_paged_attention_cannot_run(model_dir: Path) -> None:
    """``batching = false`` (what an unsupported architecture gets): the same engine, one
    DynamicCache per sequence, no prefix reuse; consecutive turns sharing a template prefix
    and concurrent requests all complete with the paged engine's greedy text."""
    paged: list[str] = []

    async def texts(client: httpx.AsyncClient) -> list[str]:
        requests = [body(f"question {i}", 12) | {"temperature": 0} for i in range(3)]
        first = [await client.post("/v1/chat/completions", json=r) for r in requests]
        together = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=r) for r in requests)
        )
        replies = [*first, *together]
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        return [r.json()["choices"][0]["message"]["content"] for r in replies]

    async def with_paged(neuron: Neuron, client: httpx.AsyncClient) -> None:
        paged.extend(await texts(client))

    async def sequential(neuron: Neuron, client: httpx.AsyncClient) -> None:
        assert await texts(client) == paged
        health = neuron.health().models[LOCAL_MODEL]
        assert health.prefix_cache is None  # no fixed-capacity cache to report
        assert health.batch is not None and health.batch.peak_sequences >= 2

    run(model_dir, with_paged)
    run(model_dir, sequential, transformers={"batching": False})


def test_an_empty_prompt_is_a_400(model_dir: Path) -> None:
    async def scenario(neuron: Neuron, client: httpx.AsyncClient) -> None:
        reply = await client.post(
            "/v1/completions", json={"model": LOCAL_MODEL, "prompt": "", "max_tokens": 4}
        )
        assert reply.status_code == 400, reply.text
        assert "empty" in reply.json()["error"]["message"]

    run(model_dir, scenario)
