"""The llamacpp harness for real: a neuron process running the tiny GGUF (Q8_0 from the hub
cache, F16 from a model directory) on llama.cpp, a cortex in front of it, and the openai and
anthropic SDKs and plain HTTP as clients."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest

from helexa.up.tiny_model import (
    GGUF_F16_FILENAME,
    GGUF_Q8_0_FILENAME,
    write_tiny_model_to_hf_cache,
)
from tests.conftest import GGUF_REPO_ID
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, start_neuron

F16_MODEL = f"gguf-dir/{GGUF_F16_FILENAME}"
MSGS = [{"role": "user", "content": "Tell me about the weather in the city, in detail."}]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def gguf_fleet(
    tmp_path_factory: pytest.TempPathFactory, hf_cache: Path
) -> Iterator[tuple[Daemon, str, str]]:
    work = tmp_path_factory.mktemp("llamacpp")
    models = work / "models"
    snapshot = write_tiny_model_to_hf_cache(work / "build", "helexa/f16", with_gguf=True)
    (models / "gguf-dir").mkdir(parents=True)
    shutil.copy(Path(snapshot) / GGUF_F16_FILENAME, models / F16_MODEL)
    neuron, neuron_url = start_neuron(
        work,
        f"""
model_dirs = ["{models}"]
keepalive_s = 0.05
[harness.llamacpp]
slots = 4
[admission]
max_concurrent = 4
max_queue = 8
[[default_models]]
model_id = "{GGUF_REPO_ID}"
quant = "Q8_0"
""",
        hf_cache=hf_cache,
    )
    catalogue = (
        f'[[models]]\nid = "{GGUF_REPO_ID}"\nquant = "Q8_0"\nvram_mb = 50\nmin_devices = 0\n'
        f'[aliases]\n"helexa/gguf" = "{GGUF_REPO_ID}"\n'
    )
    cortex, cortex_url, _metrics = start_cortex(work, {"gguf": neuron_url}, catalogue)
    yield neuron, neuron_url, cortex_url
    cortex.stop()
    neuron.stop()


@pytest.fixture(scope="module")
def neuron_url(gguf_fleet: tuple[Daemon, str, str]) -> str:
    return gguf_fleet[1]


@pytest.fixture(scope="module")
def cortex_url(gguf_fleet: tuple[Daemon, str, str]) -> str:
    return gguf_fleet[2]


def oai(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def greedy(base: str, model: str = GGUF_REPO_ID, **kwargs) -> openai.types.chat.ChatCompletion:  # type: ignore[no-untyped-def]
    args = {"messages": MSGS, "max_tokens": 24, "temperature": 0, **kwargs}
    return oai(base).chat.completions.create(model=model, **args)


def health_of(base: str, model: str = GGUF_REPO_ID) -> dict:
    return httpx.get(f"{base}/health").json()["models"][model]


def test_loads_quantized_on_llamacpp(neuron_url: str, hf_cache: Path) -> None:
    listed = {m["id"]: m for m in httpx.get(f"{neuron_url}/models").json()}
    model = listed[GGUF_REPO_ID]
    assert model["harness"] == "llamacpp" and model["status"] == "loaded"
    assert model["devices"] == [] and model["context_length"] == 2048
    gguf = next(hf_cache.glob(f"models--helexa--tiny-qwen3-gguf/snapshots/*/{GGUF_Q8_0_FILENAME}"))
    # Memory is the file as stored plus the KV cache: 2048 cells x 2 layers x 2 KV heads x
    # (128 + 128) x 2 bytes = 4 MiB; nothing dequantized.
    kv = 2048 * 2 * 2 * 256 * 2
    assert model["vram_used_mb"] == (gguf.stat().st_size + kv) // MB
    cache = health_of(neuron_url)["prefix_cache"]
    assert cache["capacity_tokens"] == 2048


def test_chat_through_cortex_with_both_sdks(cortex_url: str, neuron_url: str) -> None:
    direct = greedy(neuron_url)
    via = greedy(cortex_url, model="helexa/gguf")
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage.prompt_tokens == direct.usage.prompt_tokens > 0
    assert via.usage.completion_tokens == 24 and via.choices[0].finish_reason == "length"
    stream = oai(cortex_url).chat.completions.create(
        model="helexa/gguf",
        messages=MSGS,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 24
    claude = anthropic.Anthropic(base_url=cortex_url, api_key="unused", max_retries=0)
    message = claude.messages.create(
        model="helexa/gguf",
        max_tokens=24,
        messages=MSGS,
        extra_body={"temperature": 0},
    )
    assert message.content[0].text == direct.choices[0].message.content
    assert message.usage.output_tokens == 24 and message.stop_reason == "max_tokens"


def test_f16_file_from_a_model_dir(neuron_url: str) -> None:
    response = httpx.post(f"{neuron_url}/models/load", json={"model_id": F16_MODEL}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"]["harness"] == "llamacpp"
    q8 = greedy(neuron_url).choices[0].message.content
    f16 = greedy(neuron_url, model=F16_MODEL).choices[0].message.content
    # Same weights, two encodings: the opening tokens agree, Q8_0 rounding may drift later.
    assert f16 and q8 and f16[:4] == q8[:4]
    used = httpx.get(f"{neuron_url}/health").json()["cpu"]["memory_used_mb"]
    assert (
        httpx.post(f"{neuron_url}/models/unload", json={"model_id": F16_MODEL}).status_code == 200
    )
    assert httpx.get(f"{neuron_url}/health").json()["cpu"]["memory_used_mb"] < used


def test_seeds_and_sampling_parameters(neuron_url: str) -> None:
    def sample(**kwargs) -> str:  # type: ignore[no-untyped-def]
        return greedy(neuron_url, temperature=0.9, **kwargs).choices[0].message.content or ""

    assert sample(seed=7) == sample(seed=7)
    assert sample(seed=7) != sample(seed=8)
    tuned = sample(seed=7, top_p=0.5, extra_body={"top_k": 20, "min_p": 0.05})
    assert tuned == sample(seed=7, top_p=0.5, extra_body={"top_k": 20, "min_p": 0.05})
    penalised = (
        greedy(
            neuron_url,
            frequency_penalty=1.5,
            presence_penalty=1.0,
            extra_body={"repetition_penalty": 1.3},
        )
        .choices[0]
        .message.content
    )
    assert penalised != greedy(neuron_url).choices[0].message.content


def test_stop_strings_and_max_tokens(neuron_url: str) -> None:
    # Greedy text of a random model repeats itself; a seeded sample varies.
    seeded = {"max_tokens": 40, "temperature": 0.9, "seed": 1}
    text = greedy(neuron_url, **seeded).choices[0].message.content or ""
    start = next(i for i in range(4, len(text) - 3) if text[i : i + 3].isprintable())
    stop = text[start : start + 3]
    stopped = greedy(neuron_url, **seeded, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    completion = oai(neuron_url).completions.create(
        model=GGUF_REPO_ID, prompt="The weather", max_tokens=5, temperature=0
    )
    assert completion.usage.completion_tokens == 5
    count = httpx.post(
        f"{neuron_url}/tokenize", json={"model": GGUF_REPO_ID, "messages": MSGS}
    ).json()["count"]
    assert count == greedy(neuron_url).usage.prompt_tokens


def test_concurrent_streams_decode_together_with_solo_text(neuron_url: str) -> None:
    prompts = [
        [{"role": "user", "content": f"Question {i}: what is the weather like today?"}]
        for i in range(4)
    ]
    solo = [
        greedy(neuron_url, messages=p, max_tokens=40).choices[0].message.content for p in prompts
    ]
    before = health_of(neuron_url)["batch"]

    def streamed(messages: list[dict]) -> str:
        stream = oai(neuron_url).chat.completions.create(
            model=GGUF_REPO_ID, messages=messages, max_tokens=40, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(streamed, prompts))
    after = health_of(neuron_url)["batch"]
    assert after["peak_sequences"] >= 2
    # Four streams of 40 tokens in far fewer than 160 steps: they shared decode steps.
    assert after["steps"] - before["steps"] < 4 * 40
    assert together == solo


def test_next_turn_evaluates_only_the_new_tokens(neuron_url: str) -> None:
    system = {"role": "system", "content": "You are a weather bot. " * 40}
    first = [system, {"role": "user", "content": "Weather in Paris?"}]
    answer = greedy(neuron_url, messages=first, max_tokens=16)
    before = health_of(neuron_url)["prefix_cache"]
    second = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And tomorrow?"},
    ]
    reply = greedy(neuron_url, messages=second, max_tokens=4)
    after = health_of(neuron_url)["prefix_cache"]
    evaluated = after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"]
    reused = after["prompt_tokens_reused"] - before["prompt_tokens_reused"]
    assert after["hits"] == before["hits"] + 1
    assert reused >= answer.usage.prompt_tokens
    assert evaluated == reply.usage.prompt_tokens - reused < 40
    assert after["cached_tokens"] <= after["capacity_tokens"]


def test_an_idle_conversation_waits_in_host_memory_and_comes_back(neuron_url: str) -> None:
    """While another request runs, an idle conversation's cells go to host memory (in one
    unified cache they would slow every decode); its next turn restores them instead of
    evaluating the prompt again."""
    first = [
        {"role": "system", "content": "You are a tide-table bot. " * 30},
        {"role": "user", "content": "High tide in Brest?"},
    ]
    answer = greedy(neuron_url, messages=first, max_tokens=8)
    greedy(neuron_url, messages=[{"role": "user", "content": "Another topic"}], max_tokens=4)
    parked = health_of(neuron_url)["prefix_cache"]
    assert parked["parked_tokens"] >= answer.usage.prompt_tokens, parked
    assert parked["parked_bytes"] > 0
    second = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And low tide?"},
    ]
    reply = greedy(neuron_url, messages=second, max_tokens=4)
    after = health_of(neuron_url)["prefix_cache"]
    reused = after["prompt_tokens_reused"] - parked["prompt_tokens_reused"]
    evaluated = after["prompt_tokens_evaluated"] - parked["prompt_tokens_evaluated"]
    assert reused >= answer.usage.prompt_tokens
    assert evaluated == reply.usage.prompt_tokens - reused
    assert after["hits"] == parked["hits"] + 1
    assert after["parked_tokens"] < parked["parked_tokens"]  # it left host memory


def test_a_shared_opening_does_not_take_a_parked_conversation_away(neuron_url: str) -> None:
    """A new conversation that shares only a system prompt with a parked one reuses those
    tokens from it, and the parked conversation stays for its own next turn."""
    system = {"role": "system", "content": "You are a harbour-master bot. " * 30}
    first = [system, {"role": "user", "content": "Ships in port?"}]
    answer = greedy(neuron_url, messages=first, max_tokens=6)
    greedy(neuron_url, messages=[{"role": "user", "content": "Unrelated"}], max_tokens=2)
    before = health_of(neuron_url)["prefix_cache"]
    greedy(neuron_url, messages=[system, {"role": "user", "content": "Tides?"}], max_tokens=2)
    middle = health_of(neuron_url)["prefix_cache"]
    assert middle["hits"] == before["hits"] + 1  # the system prompt came from the parked copy
    second = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And tomorrow?"},
    ]
    reply = greedy(neuron_url, messages=second, max_tokens=2)
    after = health_of(neuron_url)["prefix_cache"]
    assert after["prompt_tokens_reused"] - middle["prompt_tokens_reused"] >= (
        answer.usage.prompt_tokens
    ), (middle, after, reply.usage)


def test_structured_output_with_a_grammar(neuron_url: str, cortex_url: str) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "celsius": {"type": "integer"}},
        "required": ["city", "celsius"],
        "additionalProperties": False,
    }
    answer = greedy(
        neuron_url,
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
    assert answer.choices[0].finish_reason == "stop"
    flag = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    stream = oai(cortex_url).chat.completions.create(
        model="helexa/gguf",
        messages=MSGS,
        max_tokens=50,
        temperature=1.0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": flag}},
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), flag)
    # Free-form objects: a random model's strings end only when it happens to pick a quote,
    # so some samples run out of tokens; every one that ends is a JSON object.
    ended = []
    for seed in (1, 2, 5):
        sample = greedy(
            neuron_url,
            max_tokens=400,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_object"},
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        content = sample.choices[0].message.content or ""
        assert content.startswith("{")
        if sample.choices[0].finish_reason == "stop":
            ended.append(json.loads(content))
    assert ended and all(isinstance(doc, dict) for doc in ended)
    bad = httpx.post(
        f"{neuron_url}/v1/chat/completions",
        json={
            "model": GGUF_REPO_ID,
            "messages": MSGS,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/x"}}},
        },
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_tools_and_template_kwargs_reach_the_gguf_template(neuron_url: str) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]

    def count(**body) -> int:  # type: ignore[no-untyped-def]
        payload = {"model": GGUF_REPO_ID, "messages": MSGS, **body}
        return httpx.post(f"{neuron_url}/tokenize", json=payload).json()["count"]

    assert count(tools=tools) > count() + 20
    round_trip = [
        *MSGS,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    answer = greedy(neuron_url, messages=round_trip, tools=tools, max_tokens=8)
    assert answer.usage.prompt_tokens > count(tools=tools)
    no_think = greedy(neuron_url, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert no_think.usage.prompt_tokens > greedy(neuron_url).usage.prompt_tokens


def test_disconnect_cancels_within_a_token(gguf_fleet: tuple[Daemon, str, str]) -> None:
    neuron, base, _ = gguf_fleet
    body = {"model": GGUF_REPO_ID, "messages": MSGS, "max_tokens": 1900, "temperature": 0}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                seen += 1
                if seen >= 3:
                    break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and health_of(base)["in_flight"]:
        time.sleep(0.05)
    assert health_of(base)["in_flight"] == 0
    # The handler has returned; the engine logs the cancellation at its next step.
    while time.monotonic() < deadline and "generation cancelled" not in neuron.log():
        time.sleep(0.05)
    cancelled = re.findall(r'msg="generation cancelled" completion_tokens=(\d+)', neuron.log())
    assert cancelled and int(cancelled[-1]) < 200
