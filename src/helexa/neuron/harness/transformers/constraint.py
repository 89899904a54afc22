"""Constrained decoding for ``response_format`` with llguidance (JSON object / JSON Schema).

``Grammars`` is built once per loaded model (the llguidance view of its tokenizer, which is
slow for large vocabularies) and caches compiled grammars. ``JsonConstraint`` is one
request's matcher: the decode loop asks it for the allowed-token mask each step and feeds it
the chosen token. This is the only module that imports llguidance.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Literal

import llguidance
import llguidance.hf
import torch

from helexa.core.errors import ApiError, bad_request
from helexa.neuron.output_parser import THINK_CLOSE, THINK_OPEN
from helexa.neuron.sampling import OutputFormat

log = logging.getLogger("helexa.neuron.constraint")

CACHED_GRAMMARS = 32  # compiled grammars kept per model (repeat schemas skip compilation)

# No free-form whitespace between JSON tokens: a model (a random one, above all) could
# otherwise spend its whole budget on a run of spaces or newlines inside a valid document.
# An override, so a schema's own "x-guidance" options cannot turn it back on.
_COMPACT = {"whitespace_flexible": False}
_ANY_OBJECT = '{"type":"object"}'

State = Literal["open", "think", "json"]


class ConstraintError(RuntimeError):
    """The matcher refused a token the mask allowed: a bug, never a client error."""


# llguidance's words when a schema outgrows its parser or lexer limits mid-generation
# ("Too many items (limit 50000…)", "too many expressions constructed", "… too big (limit …)").
_LIMIT_WORDS = ("limit", "too many", "too big")


def matcher_failure(error: str) -> Exception:
    """A matcher in error mid-generation: a schema beyond llguidance's limits is the client's
    (400 ``schema_too_complex``, as at compile time); anything else is ours."""
    if any(word in error.lower() for word in _LIMIT_WORDS):
        return bad_request(
            f"response_format schema is too complex to enforce: {error}",
            param="response_format",
            code="schema_too_complex",
        )
    return ConstraintError(error)


def _single_token(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


class Grammars:
    """One model's llguidance tokenizer and its compiled grammars (thread-safe)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int,
        eos_ids: frozenset[int],
        limits: llguidance.LLParserLimits | None = None,
    ) -> None:
        # The mask must cover every logit: the model's vocabulary is often padded past the
        # tokenizer's; padding ids are never allowed.
        n_vocab = max(len(tokenizer), vocab_size)
        eos = sorted(i for i in eos_ids if i < n_vocab) or None
        self.ll: llguidance.LLTokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=n_vocab, eos_token=eos
        )
        self.think_open = _single_token(tokenizer, THINK_OPEN)
        self.think_close = _single_token(tokenizer, THINK_CLOSE)
        # Terse errors: the verbose ones carry the parser state (and the schema) into logs.
        self.limits = limits or llguidance.LLParserLimits(verbose_errors=False)
        self._compiled: OrderedDict[OutputFormat, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, fmt: OutputFormat) -> bool:
        with self._lock:
            return fmt in self._compiled

    def compile(self, fmt: OutputFormat) -> llguidance.LLMatcher:
        """A fresh matcher for ``fmt`` (kept as a template); a 400 when it cannot be honoured.

        Runs in a worker thread: compiling a large schema can take a while."""
        with self._lock:
            template = self._compiled.get(fmt)
            if template is not None:
                self._compiled.move_to_end(fmt)
                return template.deep_copy()
        overrides: dict[str, Any] = dict(_COMPACT)
        if not fmt.strict:  # best effort: what cannot be enforced is ignored, as OpenAI does
            overrides["lenient"] = True
        schema = _ANY_OBJECT if fmt.kind == "json_object" else fmt.schema
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema or "{}", overrides=overrides
            )
        except ValueError as exc:
            raise bad_request(f"invalid JSON schema: {exc}", param="response_format") from None
        # Compiling never raises: a bad or unsatisfiable schema leaves the matcher in error.
        template = llguidance.LLMatcher(self.ll, grammar, log_level=0, limits=self.limits)
        if template.is_error():
            failure = matcher_failure(template.get_error())
            if isinstance(failure, ApiError):  # beyond llguidance's limits
                raise failure
            raise bad_request(
                f"response_format schema cannot be used: {template.get_error()}",
                param="response_format",
                code="invalid_schema",
            )
        with self._lock:
            self._compiled[fmt] = template
            self._compiled.move_to_end(fmt)
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    def prompt_closes_reasoning(self, prompt_ids: list[int]) -> bool:
        """The prompt ends right after ``</think>`` (e.g. Qwen3 with enable_thinking false)."""
        tail = self.ll.decode_bytes(prompt_ids[-8:]).rstrip()
        return tail.endswith(THINK_CLOSE.encode())

    def start(
        self,
        fmt: OutputFormat,
        *,
        matcher: object = None,
        device: torch.device,
        prompt_ids: list[int],
        reasoning_tags: bool,
        opens_reasoning: bool,
    ) -> JsonConstraint:
        """One request's constraint, the reasoning state taken from the prompt."""
        state: State = "json"
        if opens_reasoning:
            state = "think"
        elif (
            reasoning_tags
            and self.think_open is not None
            and not self.prompt_closes_reasoning(prompt_ids)
        ):
            state = "open"  # the model may begin with <think> or go straight to the JSON
        # ``matcher``: what prepare_format compiled off the loop; without it (a caller that
        # skipped it) the cache, else a compile here.
        if not isinstance(matcher, llguidance.LLMatcher):
            matcher = self.compile(fmt)
        return JsonConstraint(self, matcher, device, state)


class JsonConstraint:
    """One generation's grammar state.

    Reasoning stays free: the matcher is not fed while the model is inside ``<think>``.
    Chosen over a lark grammar with an optional free-text reasoning prefix because reasoning
    then costs no grammar work per token and the JSON grammar stays the plain compiled
    schema, cached and shared. States:

    * ``open``: a reasoning model that may start thinking; the JSON start or <think>;
    * ``think``: any text until ``</think>`` has been generated; only EOS is withheld, as
      ending the turn there would leave no content at all where JSON was required;
    * ``json``: every token masked by the grammar; done once the grammar is complete.
    """

    def __init__(
        self, grammars: Grammars, matcher: llguidance.LLMatcher, device: torch.device, state: State
    ) -> None:
        self._grammars = grammars
        self._matcher = matcher
        self._device = device
        self.state: State = state
        words = (grammars.ll.vocab_size + 31) // 32
        self._words = torch.zeros(words, dtype=torch.int32)  # llguidance's bitmask, on the CPU
        self._tail = b""  # the last bytes of reasoning, to spot a </think> split over tokens
        # Device tensors are made on first use: on the device's worker thread, which owns
        # all work on the device (this object is built on the event loop).
        self._shifts: torch.Tensor | None = None
        self._no_eos: torch.Tensor | None = None  # the reasoning mask

    @property
    def done(self) -> bool:
        """The document is complete: nothing but EOS could follow."""
        return self.state == "json" and self._matcher.is_stopped()

    def allowed(self, vocab: int) -> torch.Tensor:
        """The bool mask over ``vocab`` logits for the next token."""
        if self.state == "think":
            if self._no_eos is None or self._no_eos.numel() != vocab:
                self._no_eos = torch.ones(vocab, dtype=torch.bool, device=self._device)
                eos = [i for i in self._grammars.ll.eos_tokens if i < vocab]
                self._no_eos[eos] = False
            return self._no_eos
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        if self._matcher.is_error():
            raise matcher_failure(self._matcher.get_error())
        if self._shifts is None:
            self._shifts = torch.arange(32, dtype=torch.int32, device=self._device)
        # Unpack on the logits' device: 4 bytes per 32 ids cross the bus, not one per id.
        bits = (words.to(self._device).unsqueeze(-1) >> self._shifts) & 1
        mask = bits.view(-1).bool()
        if mask.numel() >= vocab:
            mask = mask[:vocab]
        else:  # logits past the tokenizer's vocabulary: never allowed
            mask = torch.nn.functional.pad(mask, (0, vocab - mask.numel()))
        if self.state == "open" and self._grammars.think_open is not None:
            mask[self._grammars.think_open] = True
        return mask

    def advance(self, token: int) -> None:
        """Record the chosen (non-EOS) token."""
        if self.state == "think":
            self._tail = (self._tail + self._grammars.ll.decode_bytes([token]))[-32:]
            if token == self._grammars.think_close or THINK_CLOSE.encode() in self._tail:
                self.state = "json"
            return
        if self.state == "open" and token == self._grammars.think_open:
            self.state = "think"
            return
        self.state = "json"
        if not self._matcher.consume_token(token):
            raise matcher_failure(f"grammar rejected token {token}: {self._matcher.get_error()}")
