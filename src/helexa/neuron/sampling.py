"""Sampling parameters and the logits → token decision (pure, no I/O).

Defaults come from the request, then the model's ``generation_config.json``,
then built-in fallbacks (``resolve_sampling``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from helexa.core.errors import ApiError, bad_request
from helexa.core.wire import ChatCompletionRequest, ResponseFormat, SamplingFields
from helexa.neuron.schema_limits import check_schema

if TYPE_CHECKING:  # torch only where logits are tensors: a llamacpp-only neuron never loads it
    import torch

FALLBACK_TEMPERATURE = 1.0
FALLBACK_TOP_P = 1.0
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class OutputFormat:
    """What constrained decoding must produce (engine-neutral, hashable: harnesses cache the
    compiled grammar by it). ``schema`` is the JSON Schema as compact JSON text, key order kept
    (it is the order properties are generated in)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None
    strict: bool = False  # strict: a keyword the engine cannot enforce is a 400, not ignored


def output_format(response_format: ResponseFormat | None) -> OutputFormat | None:
    """The request's ``response_format`` checked and normalised; ``None`` for free text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return OutputFormat("json_object")
    if response_format.type != "json_schema":
        raise bad_request(
            "response_format.type must be one of 'text', 'json_object', 'json_schema'; "
            f"got {response_format.type!r}",
            param="response_format",
        )
    spec = response_format.json_schema
    if not isinstance(spec, dict):
        raise bad_request(
            "response_format.json_schema is required when type is 'json_schema'",
            param="response_format",
        )
    schema = spec.get("schema", {})  # OpenAI makes it optional: any JSON value
    if not isinstance(schema, dict):
        raise bad_request(
            "response_format.json_schema.schema must be a JSON Schema object",
            param="response_format",
        )
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    check_schema(text)  # before any engine builds a grammar from it
    return OutputFormat("json_schema", schema=text, strict=spec.get("strict") is True)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = FALLBACK_TEMPERATURE
    top_p: float = FALLBACK_TOP_P
    top_k: int = 0  # 0 / -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = field(default_factory=frozenset)
    response_format: OutputFormat | None = None  # constrained decoding; None: free text
    # What the harness's prepare_format built for response_format (opaque out of harness/).
    prepared_format: object | None = field(default=None, compare=False, repr=False)

    @property
    def greedy(self) -> bool:
        # Temperatures this small overflow the softmax; they mean greedy anyway.
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalises(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _pick(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def resolve_sampling(
    request: SamplingFields,
    *,
    token_limit: int | None,
    generation_defaults: dict[str, Any],
    eos_ids: frozenset[int],
    context_length: int,
    prompt_tokens: int,
) -> SamplingParams:
    """Merge request, model defaults and fallbacks; enforce the context window."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise ApiError(
            400,
            f"this model's maximum context length is {context_length} tokens; the prompt has "
            f"{prompt_tokens} tokens, leaving no room to generate",
            param="messages",
            code="context_length_exceeded",
            details={"prompt_tokens": prompt_tokens, "context_length": context_length},
        )
    fit = isinstance(request, ChatCompletionRequest) and request.fit_max_tokens
    if token_limit is not None and token_limit > context_length and not fit:
        # As vLLM: a limit no prompt could ever leave room for is a mistake, not a wish.
        # Within the context it is clamped to what the prompt leaves (finish_reason length).
        completion_tokens = isinstance(request, ChatCompletionRequest) and bool(
            request.max_completion_tokens
        )
        field = "max_completion_tokens" if completion_tokens else "max_tokens"
        raise ApiError(
            400,
            f"{field} ({token_limit}) is greater than the model's context length "
            f"({context_length})",
            param=field,
            code="invalid_request",
        )
    max_new = room if token_limit is None else min(token_limit, room)
    top_k = _pick(request.top_k, generation_defaults.get("top_k"), 0)
    return SamplingParams(
        temperature=float(
            _pick(request.temperature, generation_defaults.get("temperature"), FALLBACK_TEMPERATURE)
        ),
        top_p=float(_pick(request.top_p, generation_defaults.get("top_p"), FALLBACK_TOP_P)),
        top_k=max(int(top_k), 0),
        min_p=float(_pick(request.min_p, generation_defaults.get("min_p"), 0.0)),
        repetition_penalty=float(
            _pick(request.repetition_penalty, generation_defaults.get("repetition_penalty"), 1.0)
        ),
        presence_penalty=float(request.presence_penalty or 0.0),
        frequency_penalty=float(request.frequency_penalty or 0.0),
        seed=request.seed,
        max_new_tokens=max_new,
        stop=tuple(request.stop_strings()),
        eos_ids=eos_ids,
        response_format=output_format(
            request.response_format if isinstance(request, ChatCompletionRequest) else None
        ),
    )


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    generated_counts: dict[int, int],
    prompt_ids: frozenset[int] = frozenset(),
) -> torch.Tensor:
    """Repetition over prompt + output (multiplicative, HF semantics), then presence and
    frequency over the output (additive, OpenAI semantics)."""
    import torch

    if not params.penalises:
        return logits
    if params.repetition_penalty != 1.0:
        seen = prompt_ids.union(generated_counts)
        if seen:
            ids = torch.tensor(sorted(seen), device=logits.device)
            picked = logits.index_select(-1, ids)
            rp = params.repetition_penalty
            picked = torch.where(picked > 0, picked / rp, picked * rp)
            logits = logits.index_copy(-1, ids, picked)
    if (params.presence_penalty or params.frequency_penalty) and generated_counts:
        ids = torch.tensor(list(generated_counts), device=logits.device)
        counts = torch.tensor(
            list(generated_counts.values()), device=logits.device, dtype=logits.dtype
        )
        picked = logits.index_select(-1, ids)
        picked = picked - params.presence_penalty - params.frequency_penalty * counts
        logits = logits.index_copy(-1, ids, picked)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p truncation (masked to -inf)."""
    import torch

    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * params.min_p
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generated_counts: dict[int, int],
    generator: torch.Generator | None,
    prompt_ids: frozenset[int] = frozenset(),
    allowed: torch.Tensor | None = None,
) -> int:
    """Choose the next token id from a 1-D logits vector; ``allowed`` (a bool vector, from
    constrained decoding) rules out every other token before any sampling decision."""
    import torch

    logits = apply_penalties(logits.float(), params, generated_counts, prompt_ids)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    if not torch.isfinite(probs).all():  # extreme penalties: fall back to the best token
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))
