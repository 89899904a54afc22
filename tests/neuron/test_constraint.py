"""llguidance constraint with the real tiny tokenizer: masks, completion, reasoning states."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from helexa.core.errors import ApiError
from helexa.core.wire import ResponseFormat
from helexa.neuron.harness.transformers.constraint import Grammars, JsonConstraint
from helexa.neuron.sampling import OutputFormat, SamplingParams, next_token, output_format
from helexa.up.tiny_model import write_tiny_model

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 8},
    },
    "required": ["ok", "color", "name"],
    "additionalProperties": False,
}
CPU = torch.device("cpu")
EOS = frozenset({505, 503})  # <|im_end|>, <|endoftext|>


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_model(Path(root))
    return AutoTokenizer.from_pretrained(root)


@pytest.fixture(scope="module")
def grammars(tokenizer: Any) -> Grammars:
    return Grammars(tokenizer, vocab_size=512, eos_ids=EOS)


def schema_format(schema: dict[str, Any], *, strict: bool = True) -> OutputFormat:
    fmt = output_format(
        ResponseFormat(
            type="json_schema",
            json_schema={"name": "t", "schema": schema, "strict": strict},
        )
    )
    assert fmt is not None
    return fmt


def run(
    constraint: JsonConstraint,
    tokenizer: Any,
    seed: int,
    *,
    forced: list[int] | None = None,
    params: SamplingParams | None = None,
    limit: int = 300,
) -> tuple[str, bool]:
    """Decode over random logits (forced tokens first); (text, ended by the grammar or EOS)."""
    params = params or SamplingParams(temperature=0.0)
    forced = forced or []
    rng = torch.Generator().manual_seed(seed)
    sampler = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for step in range(limit):
        logits = torch.randn(512, generator=rng)
        allowed = constraint.allowed(512)
        if step < len(forced):
            token = forced[step]
        else:
            gen = None if params.greedy else sampler
            token = next_token(logits, params, {}, gen, allowed=allowed)
        assert allowed[token], "a token outside the mask was chosen"
        if token in EOS:
            return tokenizer.decode(out), True
        constraint.advance(token)
        out.append(token)
        if constraint.done:
            return tokenizer.decode(out), True
    return tokenizer.decode(out), False


@pytest.mark.parametrize("seed", range(8))
def test_greedy_random_logits_validate_against_schema(
    grammars: Grammars, tokenizer: Any, seed: int
) -> None:
    fmt = schema_format(SCHEMA)
    constraint = grammars.start(
        fmt, device=CPU, prompt_ids=[], reasoning_tags=False, opens_reasoning=False
    )
    text, ended = run(constraint, tokenizer, seed)
    assert ended, text
    jsonschema.validate(json.loads(text), SCHEMA)
    assert " " not in text.split('"name"')[0]  # compact: no free whitespace between tokens


@pytest.mark.parametrize("seed", range(4))
def test_seeded_sampling_is_reproducible_and_valid(
    grammars: Grammars, tokenizer: Any, seed: int
) -> None:
    params = SamplingParams(temperature=1.0, top_k=50, seed=seed)
    texts = []
    for _ in range(2):
        constraint = grammars.start(
            schema_format(SCHEMA),
            device=CPU,
            prompt_ids=[],
            reasoning_tags=False,
            opens_reasoning=False,
        )
        texts.append(run(constraint, tokenizer, seed, params=params))
    assert texts[0] == texts[1]
    text, ended = texts[0]
    assert ended
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_is_an_object(grammars: Grammars, tokenizer: Any) -> None:
    finished = 0
    for seed in range(12):
        constraint = grammars.start(
            OutputFormat("json_object"),
            device=CPU,
            prompt_ids=[],
            reasoning_tags=False,
            opens_reasoning=False,
        )
        text, ended = run(constraint, tokenizer, seed, limit=200)
        assert text.startswith("{")
        if ended:
            finished += 1
            assert isinstance(json.loads(text), dict)
    assert finished


def test_open_reasoning_is_free_then_constrained(grammars: Grammars, tokenizer: Any) -> None:
    """The prompt opened <think>: free text (no mask) until </think>, then the schema."""
    constraint = grammars.start(
        schema_format(SCHEMA),
        device=CPU,
        prompt_ids=[],
        reasoning_tags=True,
        opens_reasoning=True,
    )
    free = constraint.allowed(512)
    assert int(free.sum()) == 512 - len(EOS) and not free[sorted(EOS)].any()  # only no EOS
    reasoning = tokenizer.encode("Let me think. ", add_special_tokens=False)
    close = tokenizer.encode("</think>", add_special_tokens=False)
    text, ended = run(constraint, tokenizer, 1, forced=reasoning + close)
    assert ended
    head, _, body = text.partition("</think>")
    assert head == "Let me think. "
    jsonschema.validate(json.loads(body), SCHEMA)


def test_close_tag_split_over_tokens_ends_reasoning(grammars: Grammars, tokenizer: Any) -> None:
    constraint = grammars.start(
        schema_format(SCHEMA),
        device=CPU,
        prompt_ids=[],
        reasoning_tags=True,
        opens_reasoning=True,
    )
    pieces = [
        t
        for part in ("</", "th", "ink", ">")
        for t in tokenizer.encode(part, add_special_tokens=False)
    ]
    assert len(pieces) > 1 and grammars.think_close not in pieces
    for token in pieces:
        assert int(constraint.allowed(512).sum()) == 512 - len(EOS)  # free, but no EOS
        constraint.advance(token)
    assert constraint.state == "json"


def test_model_may_open_reasoning_itself(grammars: Grammars, tokenizer: Any) -> None:
    """No <think> in the prompt: the first token may be <think> or the start of the JSON."""
    think = grammars.think_open
    assert think is not None
    constraint = grammars.start(
        schema_format(SCHEMA),
        device=CPU,
        prompt_ids=[],
        reasoning_tags=True,
        opens_reasoning=False,
    )
    first = constraint.allowed(512)
    assert first[think]
    json_starts = [tokenizer.decode([int(i)]) for i in first.nonzero() if int(i) != think]
    assert json_starts and all(s.startswith("{") for s in json_starts)
    close = grammars.think_close
    assert close is not None
    forced = [think, *tokenizer.encode("hmm", add_special_tokens=False), close]
    text, ended = run(constraint, tokenizer, 2, forced=forced)
    assert ended
    jsonschema.validate(json.loads(text.partition("</think>")[2]), SCHEMA)


def test_prompt_that_closed_reasoning_constrains_from_the_first_token(
    grammars: Grammars, tokenizer: Any
) -> None:
    """Qwen3 with enable_thinking false renders an empty, closed think block."""
    prompt = tokenizer.encode(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n", add_special_tokens=False
    )
    constraint = grammars.start(
        schema_format(SCHEMA),
        device=CPU,
        prompt_ids=prompt,
        reasoning_tags=True,
        opens_reasoning=False,
    )
    first = constraint.allowed(512)
    assert all(tokenizer.decode([int(i)]).startswith("{") for i in first.nonzero())


def test_tags_and_special_tokens_never_inside_the_json(grammars: Grammars, tokenizer: Any) -> None:
    constraint = grammars.start(
        OutputFormat("json_object"),
        device=CPU,
        prompt_ids=[],
        reasoning_tags=False,
        opens_reasoning=False,
    )
    for token in tokenizer.encode('{"a":"', add_special_tokens=False):
        constraint.advance(token)
    inside_string = constraint.allowed(512)
    for tag in ("<think>", "</think>", "<tool_call>", "<|im_end|>", "<|endoftext|>"):
        assert not inside_string[tokenizer.convert_tokens_to_ids(tag)], tag


def test_mask_covers_padded_logits(grammars: Grammars) -> None:
    constraint = grammars.start(
        OutputFormat("json_object"),
        device=CPU,
        prompt_ids=[],
        reasoning_tags=False,
        opens_reasoning=False,
    )
    mask = constraint.allowed(700)
    assert mask.shape == (700,) and not mask[512:].any()


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nonsense"},
        {"type": "string", "pattern": "(unclosed"},
        {"type": "integer", "minimum": 5, "maximum": 2},
        {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
    ],
)
def test_bad_schemas_are_400(grammars: Grammars, schema: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as caught:
        grammars.compile(schema_format(schema))
    assert caught.value.status == 400 and caught.value.param == "response_format"


def test_strict_refuses_what_it_cannot_enforce(grammars: Grammars) -> None:
    schema = {"type": "object", "if": {"type": "object"}, "then": {}}
    with pytest.raises(ApiError):
        grammars.compile(schema_format(schema, strict=True))
    grammars.compile(schema_format(schema, strict=False))  # best effort, as OpenAI


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, OutputFormat("json_object")),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"b": 1, "a": 2}}},
            OutputFormat("json_schema", schema='{"b":1,"a":2}'),
        ),
    ],
)
def test_output_format_normalises(body: dict[str, Any] | None, expected: Any) -> None:
    fmt = output_format(None if body is None else ResponseFormat(**body))
    assert fmt == expected
    hash(SamplingParams(response_format=fmt))  # stays hashable (grammar cache key)


@pytest.mark.parametrize(
    "body",
    [
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}},
    ],
)
def test_output_format_refuses(body: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as caught:
        output_format(ResponseFormat(**body))
    assert caught.value.status == 400 and caught.value.param == "response_format"


def test_a_schema_beyond_llguidances_limits_mid_generation_is_a_400(tokenizer: Any) -> None:
    """llguidance meets its parser limits while generating (its "Too many items"): the
    schema is the client's, so a 400 schema_too_complex, never a 500 generation failure."""
    import llguidance

    tight = Grammars(
        tokenizer,
        vocab_size=512,
        eos_ids=EOS,
        limits=llguidance.LLParserLimits(step_max_items=3, verbose_errors=False),
    )
    fmt = schema_format({"type": "array", "items": {"type": "integer"}})
    constraint = tight.start(
        fmt, device=CPU, prompt_ids=[1], reasoning_tags=False, opens_reasoning=False
    )
    with pytest.raises(ApiError) as info:
        for token in tokenizer.encode("[1,2,3,4,5,6]", add_special_tokens=False):
            constraint.allowed(512)
            constraint.advance(token)
    assert info.value.status == 400 and info.value.code == "schema_too_complex"
    assert "Too many items" in info.value.message and "<state>" not in info.value.message
