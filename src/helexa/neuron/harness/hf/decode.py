"""The decode loop of one generation, run step by step on its device's worker thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from helexa.neuron.detokenize import IncrementalDetokenizer, StopMatcher, flush_held
from helexa.neuron.harness.base import Finish, FinishReason, ModelGone
from helexa.neuron.sampling import SamplingParams, next_token
from helexa.neuron.workers import NanLogitsFlood

log = logging.getLogger("helexa.neuron.decode")

PROMPT_TAIL_TOKENS = 6


class TokenConstraint(Protocol):
    """Constrained decoding of one generation (``response_format``)."""

    @property
    def done(self) -> bool:
        """The constrained output is complete: end as if the model wrote EOS."""
        ...

    def allowed(self, vocab: int) -> torch.Tensor | None:
        """Bool mask of the tokens allowed next, on the logits' device; None: any."""
        ...

    def advance(self, token: int) -> None:
        """Record the chosen (non-EOS) token."""
        ...


class DecodeJob:
    """Prefill on the first step, then one token per step (a ``SteppedJob``).

    ``emit`` receives text deltas that are safe to show: complete UTF-8, with any
    tail that may begin a stop string held back.
    """

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        prompt_ids: list[int],
        params: SamplingParams,
        device: torch.device,
        emit: Callable[[str], None],
        is_loaded: Callable[[], bool],
        constraint: TokenConstraint | None = None,
    ) -> None:
        self._model = model
        self._constraint = constraint
        self._params = params
        self._device = device
        self._emit = emit
        self._is_loaded = is_loaded
        self._prompt_ids = prompt_ids
        self._prompt_set = (
            frozenset(prompt_ids) if params.repetition_penalty != 1.0 else frozenset()
        )
        self._detok = IncrementalDetokenizer(
            tokenizer, prompt_tail=prompt_ids[-PROMPT_TAIL_TOKENS:]
        )
        self._stops = StopMatcher(params.stop)
        self._generator: torch.Generator | None = None
        if not params.greedy:
            self._generator = torch.Generator(device=device)
            if params.seed is not None:
                self._generator.manual_seed(params.seed)
            else:
                self._generator.seed()
        self._cache: Any = None
        self._last: int | None = None
        self._counts: dict[int, int] = {}
        self._generated = 0
        self._first_token_at = 0.0
        self._finish: Finish | None = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True  # read by the worker before its next step (one token at most)

    def result(self) -> Finish:
        assert self._finish is not None
        return self._finish

    def _end(self, reason: FinishReason, stop_sequence: str | None = None) -> bool:
        self._cache = None  # free the KV cache on the device thread, now
        if reason == "cancelled":
            log.info(
                "generation cancelled",
                extra={
                    "completion_tokens": self._generated,
                    "max_tokens": self._params.max_new_tokens,
                },
            )
        if self._generated > 1 and log.isEnabledFor(logging.DEBUG):
            rate = (self._generated - 1) / (time.perf_counter() - self._first_token_at)
            log.debug(
                "generation done",
                extra={"reason": reason, "tokens": self._generated, "decode_tok_s": round(rate, 1)},
            )
        self._finish = Finish(
            reason=reason,
            prompt_tokens=len(self._prompt_ids),
            completion_tokens=self._generated,
            stop_sequence=stop_sequence,
        )
        return True

    def _forward(self) -> torch.Tensor:
        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache(config=self._model.config)
            ids = torch.tensor([self._prompt_ids], device=self._device)
        else:
            ids = torch.tensor([[self._last]], device=self._device)
        with torch.inference_mode():
            out = self._model(
                input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=1
            )
        logits = out.logits[0, -1]
        if torch.isnan(logits).any():
            raise NanLogitsFlood("model produced NaN logits")
        return logits

    def step(self) -> bool:
        if self.cancelled:
            return self._end("cancelled")
        if not self._is_loaded():
            raise ModelGone("the model was unloaded during generation")
        logits = self._forward()
        constraint = self._constraint
        allowed = None if constraint is None else constraint.allowed(logits.shape[-1])
        token = next_token(
            logits, self._params, self._counts, self._generator, self._prompt_set, allowed
        )
        self._last = token
        if token in self._params.eos_ids:
            return self._end("stop", self._flush())
        if constraint is not None:
            constraint.advance(token)
        self._generated += 1
        if self._generated == 1:
            self._first_token_at = time.perf_counter()
        self._counts[token] = self._counts.get(token, 0) + 1
        text = self._stops.push(self._detok.push(token))
        if text:
            self._emit(text)
        if self._stops.matched is not None:
            return self._end("stop", self._stops.matched)
        if constraint is not None and constraint.done:  # the document is complete: a stop
            return self._end("stop", self._flush())
        if self._generated >= self._params.max_new_tokens:
            matched = self._flush()
            return self._end("stop" if matched else "length", matched)
        return False

    def _flush(self) -> str | None:
        """Emit what the detokenizer held back; the stop string it completed, if any."""
        tail = flush_held(self._detok, self._stops)
        if tail:
            self._emit(tail)
        return self._stops.matched
