"""A real neuron process with the tiny model, driven by the openai SDK and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import openai
import pytest

from helexa.up.tiny_model import TINY_REPO_ID
from tests.conftest import GGUF_REPO_ID, LOCAL_MODEL

MSGS = [{"role": "user", "content": "Tell me about the weather in the city."}]


@pytest.fixture(scope="module")
def base(neuron):  # type: ignore[no-untyped-def]
    return neuron[1]


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, **kwargs):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(model=TINY_REPO_ID, messages=MSGS, **kwargs)


def stream_text(client: openai.OpenAI, **kwargs) -> tuple[str, list]:  # type: ignore[no-untyped-def]
    chunks = list(chat(client, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# --- discovery, health, models -----------------------------------------------------------------


def test_discovery_reports_cpu_host(base: str) -> None:
    body = httpx.get(f"{base}/discovery").json()
    assert body["devices"] == []
    assert body["cpu"]["cores"] >= 1 and body["cpu"]["memory_total_mb"] > 0
    assert body["harnesses"] == ["llamacpp", "transformers"]
    assert body["hostname"] and body["kernel"] and body["os"]


def test_health_and_models(base: str) -> None:
    health = httpx.get(f"{base}/health").json()
    assert health["activation"]["state"] == "ready"
    assert TINY_REPO_ID in health["activation"]["completed"]
    model = health["models"][TINY_REPO_ID]
    assert (model["in_flight"], model["queued"]) == (0, 0)
    # The paged KV cache, allocated at load: its capacity, nothing held by running requests.
    cache = model["prefix_cache"]
    assert cache["capacity_tokens"] >= 2048 and cache["running_tokens"] == 0
    assert cache["free_tokens"] + cache["cached_tokens"] >= cache["capacity_tokens"]
    assert model["batch"]["steps"] >= 0
    assert health["cpu"]["memory_used_mb"] >= 1 and health["cpu"]["memory_free_mb"] > 0
    models = httpx.get(f"{base}/models").json()
    tiny = next(m for m in models if m["id"] == TINY_REPO_ID)
    assert tiny["status"] == "loaded" and tiny["harness"] == "transformers"
    assert tiny["devices"] == [] and tiny["context_length"] == 2048


@pytest.mark.parametrize("path", ["helexa%2Ftiny-qwen3", "helexa/tiny-qwen3"])
def test_endpoint_route_accepts_encoded_and_raw_slash(base: str, path: str) -> None:
    response = httpx.get(f"{base}/models/{path}/endpoint")
    assert response.status_code == 200
    assert response.json()["url"] == f"{base}/v1"


def test_endpoint_unknown_model_is_404(base: str) -> None:
    response = httpx.get(f"{base}/models/nobody%2Fnothing/endpoint")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


# --- chat completions ------------------------------------------------------------------------


def test_non_streaming_chat(client: openai.OpenAI) -> None:
    answer = chat(client, max_tokens=12, seed=3)
    assert answer.object == "chat.completion"
    assert answer.model == TINY_REPO_ID
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in {"stop", "length"}
    usage = answer.usage
    assert usage.prompt_tokens > 5
    assert 1 <= usage.completion_tokens <= 12 or choice.finish_reason == "stop"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 12


def test_stream_matches_non_stream_for_same_seed(client: openai.OpenAI) -> None:
    whole = chat(client, max_tokens=24, seed=11, temperature=1.0)
    text, chunks = stream_text(
        client, max_tokens=24, seed=11, temperature=1.0, stream_options={"include_usage": True}
    )
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    usage_chunks = [c for c in chunks if c.usage is not None]
    # The opening chunk carries the prompt's usage (so a translator can report it before
    # any text); the last, usage-only chunk carries the totals.
    opening, totals = usage_chunks
    assert opening is chunks[0] and opening.choices[0].delta.role == "assistant"
    assert (opening.usage.prompt_tokens, opening.usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        0,
    )
    assert totals is chunks[-1] and not chunks[-1].choices
    assert totals.usage.completion_tokens == whole.usage.completion_tokens
    assert totals.usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    _text, chunks = stream_text(client, max_tokens=4)
    assert all(c.usage is None for c in chunks)


def test_seeded_sampling_is_reproducible_and_seed_matters(client: openai.OpenAI) -> None:
    params = {
        "max_tokens": 20,
        "temperature": 1.3,
        "top_p": 0.95,
        "extra_body": {"top_k": 50, "min_p": 0.01},
    }
    first = chat(client, seed=1234, **params).choices[0].message.content
    again = chat(client, seed=1234, **params).choices[0].message.content
    assert first == again
    others = {chat(client, seed=s, **params).choices[0].message.content for s in (1, 2, 3, 4)}
    assert len(others | {first}) > 1


def test_greedy_is_deterministic(client: openai.OpenAI) -> None:
    a = chat(client, max_tokens=16, temperature=0).choices[0].message.content
    b = chat(client, max_tokens=16, temperature=0, seed=99).choices[0].message.content
    assert a == b


def test_penalties_change_greedy_output(client: openai.OpenAI) -> None:
    plain = chat(client, max_tokens=40, temperature=0).choices[0].message.content
    penalised = chat(
        client,
        max_tokens=40,
        temperature=0,
        frequency_penalty=2.0,
        presence_penalty=2.0,
        extra_body={"repetition_penalty": 1.8},
    )
    assert penalised.choices[0].message.content != plain


def test_vanishing_temperature_is_greedy(client: openai.OpenAI) -> None:
    greedy = chat(client, max_tokens=8, temperature=0).choices[0].message.content
    tiny = chat(client, max_tokens=8, temperature=1e-39).choices[0].message.content
    assert tiny == greedy


def test_max_tokens_and_max_completion_tokens(client: openai.OpenAI) -> None:
    for kwargs in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        answer = chat(client, temperature=0, **kwargs)
        if answer.choices[0].finish_reason == "length":
            assert answer.usage.completion_tokens == 3
        else:
            assert answer.usage.completion_tokens < 3


def test_stop_string_cuts_output(client: openai.OpenAI) -> None:
    full = chat(client, max_tokens=60, temperature=0).choices[0].message.content
    assert len(full) > 12, full
    stop = full[8:11]
    expected = full[: full.index(stop)]
    answer = chat(client, max_tokens=60, temperature=0, stop=[stop, "\x00never"])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    streamed, _ = stream_text(client, max_tokens=60, temperature=0, stop=stop)
    assert streamed == expected


def test_context_length_exceeded(client: openai.OpenAI) -> None:
    long = "weather city rain " * 1200
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=TINY_REPO_ID, max_tokens=5, messages=[{"role": "user", "content": long}]
        )
    assert info.value.status_code == 400
    assert info.value.body["code"] == "context_length_exceeded"


def test_keepalive_comments_while_prefilling(base: str) -> None:
    """keepalive_s is 5 ms on this neuron; a ~1500-token prefill takes longer."""
    body = {
        "model": TINY_REPO_ID,
        "stream": True,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "the weather in a city " * 250}],
    }
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
        raw = b"".join(response.iter_raw()).decode()
    assert ": keep-alive\n\n" in raw
    assert raw.endswith("data: [DONE]\n\n")


def test_client_disconnect_stops_generation(neuron, base: str) -> None:  # type: ignore[no-untyped-def]
    daemon = neuron[0]
    before = daemon.log().count("generation cancelled")
    body = {
        "model": TINY_REPO_ID,
        "stream": True,
        "max_tokens": 1900,
        "temperature": 0,
        "messages": MSGS,
    }
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    deadline = time.monotonic() + 10
    while daemon.log().count("generation cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    line = daemon.log().splitlines()
    cancelled = [entry for entry in line if "generation cancelled" in entry][-1]
    generated = int(re.search(r"completion_tokens=(\d+)", cancelled).group(1))
    assert generated < 1900
    assert httpx.get(f"{base}/health").json()["models"][TINY_REPO_ID]["in_flight"] == 0


def test_admission_queue_full_is_503_with_retry_after(base: str) -> None:
    """max_concurrent=2, max_queue=2: of 8 simultaneous long requests some are turned away."""
    body = {"model": TINY_REPO_ID, "max_tokens": 300, "temperature": 0, "messages": MSGS}

    def post(_i: int) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 4, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, statuses
    for response in rejected:
        assert response.headers["retry-after"].isdigit()
        assert response.json()["error"]["code"] == "queue_full"


# --- legacy completions and tokenize ----------------------------------------------------------


def test_legacy_completions(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=TINY_REPO_ID, prompt="The weather", max_tokens=10, seed=5, temperature=0.8
    )
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason in {"stop", "length"}
    streamed = client.completions.create(
        model=TINY_REPO_ID,
        prompt="The weather",
        max_tokens=10,
        seed=5,
        temperature=0.8,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_tokenize_counts_the_rendered_prompt(base: str, client: openai.OpenAI) -> None:
    count = httpx.post(f"{base}/tokenize", json={"model": TINY_REPO_ID, "messages": MSGS}).json()
    assert count["count"] == chat(client, max_tokens=1).usage.prompt_tokens
    plain = httpx.post(f"{base}/tokenize", json={"model": TINY_REPO_ID, "prompt": "weather"})
    assert plain.json()["count"] >= 1


# --- errors -----------------------------------------------------------------------------------


def post(base: str, path: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(f"{base}{path}", timeout=30, **kwargs)


def assert_envelope(
    response: httpx.Response, status: int, *, code: str | None = None, param: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["message"]
    if code:
        assert error["code"] == code, error
    if param:
        assert error["param"] == param, error
    return error


def test_malformed_json_is_400(base: str) -> None:
    assert_envelope(
        post(base, "/v1/chat/completions", content=b'{"model": '), 400, code="invalid_json"
    )
    assert_envelope(post(base, "/v1/chat/completions", content=b"[1, 2]"), 400, code="invalid_json")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"stop": 7}, "stop"),
        ({"n": 2}, "n"),
        ({"seed": 2**64}, "seed"),
        ({"repetition_penalty": 1e-39}, "repetition_penalty"),
    ],
)
def test_wrong_types_name_the_field(base: str, patch: dict, param: str) -> None:
    body = {"model": TINY_REPO_ID, "messages": MSGS, **patch}
    assert_envelope(post(base, "/v1/chat/completions", json=body), 400, param=param)


def test_missing_model_field(base: str) -> None:
    assert_envelope(post(base, "/v1/chat/completions", json={"messages": MSGS}), 400, param="model")


def test_unknown_model_is_404(client: openai.OpenAI, base: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nobody/nothing", messages=MSGS)
    assert info.value.body["code"] == "model_not_found"
    assert_envelope(post(base, "/tokenize", json={"model": "x/y", "prompt": "a"}), 404)


def test_unknown_route_and_method_use_envelope(base: str) -> None:
    assert_envelope(httpx.get(f"{base}/nope"), 404)
    assert_envelope(httpx.get(f"{base}/v1/chat/completions"), 405)


def test_image_content_on_text_model_is_400(base: str) -> None:
    body = {
        "model": TINY_REPO_ID,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                ],
            }
        ],
    }
    assert_envelope(post(base, "/v1/chat/completions", json=body), 400, param="messages[0].content")


# --- load / unload ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["../../etc", "/etc", "~/secrets", "local-tiny/../../x"])
def test_path_escape_is_403(base: str, model_id: str) -> None:
    assert_envelope(
        post(base, "/models/load", json={"model_id": model_id}),
        403,
        code="path_not_allowed",
        param="model_id",
    )


def test_load_errors_are_4xx_with_reason(base: str) -> None:
    assert_envelope(
        post(base, "/models/load", json={"model_id": "a/b", "harness": "vllm"}),
        400,
        code="unknown_harness",
    )
    missing = assert_envelope(
        post(base, "/models/load", json={"model_id": "nobody/absent"}),
        404,
        code="model_weights_not_found",
    )
    assert "offline" in missing["message"]
    assert_envelope(
        post(base, "/models/load", json={"model_id": "bogus-arch"}),
        400,
        code="unsupported_architecture",
    )
    assert_envelope(
        post(base, "/models/load", json={"model_id": TINY_REPO_ID + "-nope", "quant": "Q4_K_M"}),
        404,
    )
    assert_envelope(post(base, "/models/load", json={}), 400, param="model_id")
    assert_envelope(post(base, "/models/unload", json={"model_id": "never/loaded"}), 404)


def test_already_loaded(base: str) -> None:
    response = post(base, "/models/load", json={"model_id": TINY_REPO_ID})
    assert response.status_code == 200 and response.json()["status"] == "already_loaded"


def test_concurrent_duplicate_loads_share_one_load(neuron, base: str) -> None:  # type: ignore[no-untyped-def]
    daemon = neuron[0]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(
                lambda _i: post(base, "/models/load", json={"model_id": LOCAL_MODEL}), range(6)
            )
        )
    assert [r.status_code for r in responses] == [200] * 6
    loads = [
        ln
        for ln in daemon.log().splitlines()
        if "msg=load " in ln and f"model_id={LOCAL_MODEL} " in ln
    ]
    assert len(loads) == 1, loads
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(model=LOCAL_MODEL, messages=MSGS, max_tokens=3)
    assert answer.usage.completion_tokens >= 1
    assert post(base, "/models/unload", json={"model_id": LOCAL_MODEL}).json() == {
        "status": "unloaded"
    }
    assert_envelope(post(base, "/models/unload", json={"model_id": LOCAL_MODEL}), 404)
    assert LOCAL_MODEL not in {m["id"] for m in httpx.get(f"{base}/models").json()}


def test_gguf_load_by_quant_tag(base: str) -> None:
    response = post(base, "/models/load", json={"model_id": GGUF_REPO_ID, "quant": "Q8_0"})
    assert response.status_code == 200, response.text
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(model=GGUF_REPO_ID, messages=MSGS, max_tokens=4)
    assert answer.usage.prompt_tokens > 5
    assert post(base, "/models/unload", json={"model_id": GGUF_REPO_ID}).status_code == 200


def test_size_from_the_files_without_loading(base: str, hf_cache) -> None:  # type: ignore[no-untyped-def]
    from helexa.up.tiny_model import GGUF_Q8_0_FILENAME

    gguf = post(base, "/models/size", json={"model_id": GGUF_REPO_ID, "quant": "Q8_0"})
    assert gguf.status_code == 200, gguf.text
    size = gguf.json()
    [path] = (hf_cache / "models--helexa--tiny-qwen3-gguf" / "snapshots").glob(
        f"*/{GGUF_Q8_0_FILENAME}"
    )
    assert size["weights_bytes"] == path.stat().st_size  # the file as stored, not dequantized
    assert size["kv_bytes"] > 0 and size["bytes"] == size["weights_bytes"] + size["kv_bytes"]
    assert GGUF_REPO_ID not in {m["id"] for m in httpx.get(f"{base}/models").json()}
    dense = post(base, "/models/size", json={"model_id": TINY_REPO_ID}).json()
    loaded = next(m for m in httpx.get(f"{base}/models").json() if m["id"] == TINY_REPO_ID)
    # fp32 weights plus the KV cache the load allocates: 0.2 x the weights, but at least the
    # tiny model's whole 2048-token context (+ a block per sequence) at 4 KiB a token.
    assert dense["kv_bytes"] == dense["bytes"] - dense["weights_bytes"]
    assert dense["kv_bytes"] == max(int(dense["weights_bytes"] * 0.2), (128 + 8) * 16 * 4096)
    assert abs(dense["bytes"] // (1024 * 1024) - loaded["vram_used_mb"]) <= 1
    assert_envelope(
        post(base, "/models/size", json={"model_id": "nobody/absent"}),
        404,
        code="model_weights_not_found",
    )
    assert_envelope(
        post(base, "/models/size", json={"model_id": GGUF_REPO_ID, "quant": "Q2_K"}),
        404,
        code="model_weights_not_found",
    )


def test_non_streaming_client_that_leaves_stops_generation(neuron, base: str) -> None:  # type: ignore[no-untyped-def]
    daemon = neuron[0]
    before = daemon.log().count("generation cancelled")
    body = {"model": TINY_REPO_ID, "max_tokens": 1900, "temperature": 0, "messages": MSGS}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while daemon.log().count("generation cancelled") == before:
        assert time.monotonic() < deadline, "the neuron kept generating for nobody"
        time.sleep(0.05)
    assert "client left; generation cancelled" in daemon.log()
