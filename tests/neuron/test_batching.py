"""Continuous batching on the transformers harness, through a real neuron process: batched text
equals solo text, requests join mid-decode, cancellation frees KV blocks, a second turn reuses
its prefix, and a long prompt is read in chunks while another stream keeps producing."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from helexa.up.tiny_model import write_tiny_model
from tests.support.procs import start_neuron

MODEL = "long-tiny"
BATCH_TOKENS = 256


@pytest.fixture(scope="module")
def neuron_url(tmp_path_factory: pytest.TempPathFactory, hf_cache: Path) -> Iterator[str]:
    work = tmp_path_factory.mktemp("batching")
    write_tiny_model(
        work / "models" / MODEL, max_position_embeddings=8192, hidden_size=256, num_layers=4
    )
    neuron, url = start_neuron(
        work,
        f"""
model_dirs = ["{work / "models"}"]
harnesses = [{{name = "transformers"}}]
[harness.transformers]
kv_cache_mb = 96
batch_tokens = {BATCH_TOKENS}
max_sequences = 6
[admission]
max_concurrent = 6
[[default_models]]
model_id = "{MODEL}"
""",
        hf_cache=hf_cache,
    )
    yield url
    neuron.stop()


def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def health_of(base: str) -> dict:
    return httpx.get(f"{base}/health").json()["models"][MODEL]


def ask(base: str, content: str, **kwargs) -> str:  # type: ignore[no-untyped-def]
    args = {"max_tokens": 30, "temperature": 0, **kwargs}
    reply = oai(base).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **args
    )
    return reply.choices[0].message.content or ""


def streamed(base: str, content: str, **kwargs) -> str:  # type: ignore[no-untyped-def]
    args = {"max_tokens": 30, "temperature": 0, **kwargs}
    stream = oai(base).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], stream=True, **args
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_the_cache_is_fixed_at_load_and_counted(neuron_url: str) -> None:
    model = httpx.get(f"{neuron_url}/models").json()[0]
    cache = health_of(neuron_url)["prefix_cache"]
    # 96 MiB of KV at 4 layers x 2 KV heads x 128 x (K + V) x 4 bytes = 8 KiB per token.
    assert cache["capacity_tokens"] == 96 * 1024 // 8
    assert model["context_length"] == 8192
    assert model["vram_used_mb"] >= 96  # weights + the whole KV cache, allocated at load


def test_batched_output_equals_solo_for_mixed_prompt_lengths(neuron_url: str) -> None:
    # A short question, one read in two chunks and one in four, greedy and seeded sampling.
    prompts = [
        ("weather?", {}),
        ("weather in the city " * 60, {}),
        ("tell me about the sea " * 150, {}),
        ("weather?", {"temperature": 1.0, "seed": 7}),
        ("clouds and rain " * 40, {"temperature": 0.8, "top_p": 0.9, "seed": 3}),
    ]
    solo = [ask(neuron_url, text, **extra) for text, extra in prompts]
    before = health_of(neuron_url)["batch"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: streamed(neuron_url, p[0], **p[1]), prompts))
    after = health_of(neuron_url)["batch"]
    assert together == solo
    assert len(set(solo)) > 2  # distinct answers, so the comparison means something
    assert after["peak_sequences"] >= 3
    assert after["steps"] - before["steps"] < len(prompts) * 30  # they shared steps


def test_a_request_joins_mid_decode(neuron_url: str) -> None:
    alone_first = ask(neuron_url, "first stream", max_tokens=120, temperature=0.7, seed=1)
    alone_second = ask(neuron_url, "second one", max_tokens=20, temperature=0.7, seed=2)
    first_started = threading.Event()
    pieces: list[str] = []

    def first() -> None:
        stream = oai(neuron_url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "first stream"}],
            max_tokens=120,
            temperature=0.7,
            seed=1,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                first_started.set()

    runner = threading.Thread(target=first)
    runner.start()
    assert first_started.wait(30)
    joined = ask(neuron_url, "second one", max_tokens=20, temperature=0.7, seed=2)
    runner.join(60)
    assert joined == alone_second
    assert "".join(pieces) == alone_first


def test_cancelling_frees_the_requests_blocks(neuron_url: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a long answer please " * 20}],
        "max_tokens": 3000,
        "stream": True,
    }
    with httpx.stream("POST", f"{neuron_url}/v1/chat/completions", json=body) as response:
        for _line in response.iter_lines():
            if health_of(neuron_url)["prefix_cache"]["running_tokens"] > 100:
                break  # the request holds KV blocks now; leave
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = health_of(neuron_url)
        if health["in_flight"] == 0 and health["prefix_cache"]["running_tokens"] == 0:
            break
        time.sleep(0.05)
    cache = health_of(neuron_url)["prefix_cache"]
    assert cache["running_tokens"] == 0
    # What it evaluated stays as a retained prefix (evictable); nothing else is held, but for
    # the unused tail of each slot's last 16-token block.
    slack = 6 * 16
    assert cache["free_tokens"] + cache["cached_tokens"] + slack >= cache["capacity_tokens"]


def test_second_turn_computes_only_the_new_tokens(neuron_url: str) -> None:
    system = {"role": "system", "content": "You are a weather bot. " * 40}
    first = [system, {"role": "user", "content": "Weather in Paris?"}]
    client = oai(neuron_url)
    answer = client.chat.completions.create(
        model=MODEL, messages=first, max_tokens=16, temperature=0
    )
    before = health_of(neuron_url)["prefix_cache"]
    second = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And tomorrow?"},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=second, max_tokens=4, temperature=0
    )
    after = health_of(neuron_url)["prefix_cache"]
    reused = after["prompt_tokens_reused"] - before["prompt_tokens_reused"]
    evaluated = after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"]
    assert after["hits"] == before["hits"] + 1
    assert reused >= answer.usage.prompt_tokens
    assert evaluated == reply.usage.prompt_tokens - reused < 40


def test_a_long_prompt_does_not_stall_a_running_stream(neuron_url: str) -> None:
    """While a ~4 000-token prompt is read (in chunks of BATCH_TOKENS), the running stream
    gets a token every step: it keeps producing instead of waiting for the whole prompt."""
    arrivals: list[float] = []
    started, finished = threading.Event(), threading.Event()

    def running() -> None:
        stream = oai(neuron_url).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "keep talking"}],
            max_tokens=2000,
            temperature=0,  # the tiny model then repeats itself rather than ending
            stream=True,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                started.set()
            if finished.is_set():
                break  # leaving cancels the rest
        stream.close()

    runner = threading.Thread(target=running)
    runner.start()
    assert started.wait(30)
    before = health_of(neuron_url)["batch"]
    sent = time.monotonic()
    long_reply = oai(neuron_url).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "the sea and the sky " * 800}],
        max_tokens=1,
        temperature=0,
    )
    done = time.monotonic()
    after = health_of(neuron_url)["batch"]
    finished.set()
    runner.join(60)
    assert arrivals[-1] > done  # the stream outlived the long prompt's reading
    prompt_tokens = long_reply.usage.prompt_tokens
    assert prompt_tokens >= 4000
    chunks = -(-prompt_tokens // BATCH_TOKENS)
    assert after["steps"] - before["steps"] >= chunks  # the prompt took several steps...
    during = sum(1 for t in arrivals if sent <= t <= done)
    # ...and the other stream got text out through them (events, each one or more tokens;
    # half the chunks leaves room for delivery batching). Read whole, it would get ~1.
    assert during >= chunks // 2
