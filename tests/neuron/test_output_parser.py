"""Reasoning and native tool-call extraction, at every possible split of the text."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from helexa.core.settings import load_settings
from helexa.core.stream import ReasoningDelta, TextDelta, ToolCallDelta, openai_message
from helexa.core.wire import ModelSpec
from helexa.neuron.app import build_app
from helexa.neuron.config import NeuronSettings
from helexa.neuron.harness.engine import StepChunk
from helexa.neuron.harness.transformers.batched import PagedBackend
from helexa.neuron.output_parser import TaggedOutput
from helexa.neuron.service import Neuron
from tests.conftest import LOCAL_MODEL
from tests.support.inprocess import IN_PROCESS

OUTPUT = (
    "<think>\nThe user wants weather.</think>\n\nLet me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
    "</tool_call>\n"
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
)


def run(parser: TaggedOutput, pieces: list[str]) -> dict:
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    return openai_message(events)


@pytest.mark.parametrize("split", range(1, len(OUTPUT)))
def test_any_two_way_split(split: int) -> None:
    message = run(TaggedOutput(reasoning=True, tools=True), [OUTPUT[:split], OUTPUT[split:]])
    assert message["reasoning_content"] == "The user wants weather."
    assert message["content"] == "Let me check.\n"
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]


def test_char_by_char_and_events_are_incremental() -> None:
    parser = TaggedOutput(reasoning=True, tools=True)
    events = [e for ch in OUTPUT for e in parser.feed(ch)] + parser.finish()
    assert all("<" not in e.text for e in events if isinstance(e, TextDelta))
    assert sum(isinstance(e, ReasoningDelta) for e in events) > 5  # streamed, not held back
    assert [e.index for e in events if isinstance(e, ToolCallDelta)] == [0, 1]
    assert parser.saw_tool_calls


def test_text_of_one_kind_in_a_feed_is_one_event() -> None:
    parser = TaggedOutput(reasoning=True, tools=True)
    assert parser.feed("a <thi") == [TextDelta("a ")]  # a tag may begin: held back
    assert parser.feed("nk> why</think> so <tool_call>{bad}</tool_call> on") == [
        ReasoningDelta("why"),
        TextDelta("so <tool_call>{bad}</tool_call>on"),
    ]


def test_malformed_and_unterminated_calls_are_reported_as_text() -> None:
    parser = TaggedOutput(reasoning=False, tools=True)
    message = run(parser, ['Hi <tool_call>{not json}</tool_call> and <tool_call>{"na'])
    assert message["content"] == 'Hi <tool_call>{not json}</tool_call>and <tool_call>{"na'
    assert "tool_calls" not in message and parser.malformed_calls == 2
    # A call without a name is text too: a whole answer and a stream must agree on that.
    nameless = TaggedOutput(reasoning=False, tools=True)
    message = run(nameless, ['<tool_call>{"name": "", "arguments": {}}</tool_call>'])
    assert "tool_calls" not in message and not nameless.saw_tool_calls


def test_prompt_that_opened_think_and_tags_disabled() -> None:
    opened = run(
        TaggedOutput(reasoning=True, tools=False, in_reasoning=True),
        ["step one", "</think>answer <tool_call>x</tool_call>"],
    )
    assert opened["reasoning_content"] == "step one"
    assert opened["content"] == "answer <tool_call>x</tool_call>"  # no tools asked: plain text
    lone = run(TaggedOutput(reasoning=True, tools=True), ["a < b and <thin", "king"])
    assert lone["content"] == "a < b and <thinking"


def test_real_decode_path_emits_reasoning_and_tool_calls(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model is forced (through its logits) to write OUTPUT token by token; the
    real tokenizer, detokenizer, parser and SSE path turn it into OpenAI fields."""
    settings = load_settings(
        NeuronSettings, None, {"model_dirs": [model_dir], "workers": IN_PROCESS}
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]

    async def scenario() -> None:
        neuron = Neuron(settings)
        neuron.start()
        try:
            await neuron.load(ModelSpec(model_id=LOCAL_MODEL))
            loaded = neuron.harnesses["transformers"].get(LOCAL_MODEL)  # type: ignore[attr-defined]
            script = loaded.tokenizer.encode(OUTPUT, add_special_tokens=False)
            script.append(loaded.tokenizer.convert_tokens_to_ids("<|im_end|>"))
            vocab = loaded.model.config.vocab_size

            # One request at a time; the script restarts with each prompt (a position that
            # does not follow the previous step's).
            produced = {"n": 0, "next": -1}

            def forward(self: PagedBackend, chunks: list[StepChunk]) -> torch.Tensor:
                if chunks[0].start != produced["next"]:
                    produced["n"] = 0
                produced["next"] = chunks[0].start + len(chunks[0].tokens)
                logits = torch.zeros(1, vocab)
                logits[0, script[produced["n"]]] = 100.0
                produced["n"] += 1
                return logits

            monkeypatch.setattr(PagedBackend, "_forward", forward)
            body = {
                "model": LOCAL_MODEL,
                "tools": tools,
                "max_tokens": 200,
                "messages": [{"role": "user", "content": "weather in Paris?"}],
            }
            transport = httpx.ASGITransport(app=build_app(neuron))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                whole = (await client.post("/v1/chat/completions", json=body)).json()
                raw = (
                    await client.post("/v1/chat/completions", json={**body, "stream": True})
                ).text
                plain = (
                    await client.post("/v1/chat/completions", json={**body, "tool_choice": "none"})
                ).json()
            choice = whole["choices"][0]
            assert choice["finish_reason"] == "tool_calls"
            message = choice["message"]
            assert message["reasoning_content"] == "The user wants weather."
            assert [c["function"]["name"] for c in message["tool_calls"]] == [
                "get_weather",
                "get_time",
            ]
            chunks = [
                json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")
            ]
            deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
            assert any(d.get("tool_calls") for d in deltas)
            assert any(d.get("reasoning_content") for d in deltas)
            assert not any("<tool_call>" in (d.get("content") or "") for d in deltas)
            assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
            # tool_choice "none": tools are not offered, so the call text stays text.
            assert plain["choices"][0]["finish_reason"] == "stop"
            assert "<tool_call>" in plain["choices"][0]["message"]["content"]
        finally:
            await neuron.stop()

    asyncio.run(scenario())
