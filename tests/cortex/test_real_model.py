"""The real instruct model (SmolLM2-135M-Instruct, GGUF and dense) through cortex with the
official SDKs: the same greedy answers as the neuron gives directly, on every API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.conftest import REAL_DENSE, REAL_GGUF
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon

QUESTION = "What is 2+2?"
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, real_neuron: tuple[Daemon, str]
) -> Iterator[str]:
    models = "".join(f'[[models]]\nid = "{m}"\nmin_devices = 0\n' for m in (REAL_GGUF, REAL_DENSE))
    models += f'[aliases]\n"helexa/default" = "{REAL_GGUF}"\n'
    daemon, base, _metrics = start_cortex(
        tmp_path_factory.mktemp("real-cortex"), {"real": real_neuron[1]}, models
    )
    yield base
    daemon.stop()


def direct(neuron: str, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    response = httpx.post(f"{neuron}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("model", [REAL_GGUF, REAL_DENSE])
def test_sdks_through_cortex_get_the_neurons_answer(
    gateway: str, real_neuron: tuple[Daemon, str], real_models: tuple[Path, Path], model: str
) -> None:
    expected = direct(real_neuron[1], model)
    assert "4" in expected
    oai = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    answer = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert answer.choices[0].message.content == expected
    streamed = oai.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    claude = anthropic.Anthropic(base_url=gateway, api_key="unused", max_retries=0)
    message = claude.messages.create(
        model=model,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"temperature": 0},  # greedy (this SDK version has no temperature argument)
    )
    assert "".join(b.text for b in message.content if b.type == "text") == expected
    with claude.messages.stream(
        model=model,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"temperature": 0},
    ) as stream:
        assert "".join(stream.text_stream) == expected
    response = oai.responses.create(
        model=model, input=QUESTION, temperature=0, max_output_tokens=MAX_TOKENS
    )
    assert response.output_text == expected


def test_the_alias_serves_the_gguf(gateway: str, real_neuron: tuple[Daemon, str]) -> None:
    oai = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    answer = oai.chat.completions.create(
        model="helexa/default",
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert answer.choices[0].message.content == direct(real_neuron[1], REAL_GGUF)
