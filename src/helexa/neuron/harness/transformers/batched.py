"""The transformers half of the batched engine (``harness.engine.Backend``): the paged KV
cache, one packed forward pass per step with ``paged_attention``, per-request sampling.

Per token, the host waits only for the sampled ids (one transfer per step for every
sequence, together with their finite-logits flags); greedy rows are picked in one argmax.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from helexa.neuron.device_thread import is_device_fault
from helexa.neuron.harness.engine import Generation, StepChunk
from helexa.neuron.harness.transformers.attention import (
    ATTENTION,
    STEP_KWARG,
    DecodeGroup,
    PromptSpan,
    StepLayout,
    register,
)
from helexa.neuron.harness.transformers.paged import KvShape, PagedKv, contiguous_start
from helexa.neuron.sampling import next_token

# Only these layer kinds attend the way paged_attention computes (softmax over keys, with an
# optional sliding window); models with anything else decode one request at a time.
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def kv_shape(model: Any) -> KvShape | None:
    """The KV cache shape of ``model`` when the batched engine can run it, else None."""
    config = getattr(model, "config", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        return None
    config = getattr(config, "get_text_config", lambda: config)()
    if getattr(config, "attn_logit_softcapping", None):
        return None  # soft-capped scores (Gemma 2): SDPA cannot apply the cap
    if not set(getattr(config, "layer_types", None) or ["full_attention"]) <= SUPPORTED_LAYER_TYPES:
        return None
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attentions = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if len(attentions) != layers or any(hasattr(m, "sinks") for m in attentions):
        return None  # attention sinks (gpt-oss) add a term paged_attention does not compute
    if getattr(config, "v_head_dim", None) not in (None, head_dim):
        return None  # values narrower than keys (MLA)
    return KvShape(layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype=model.dtype)


def use_paged_attention(model: Any) -> None:
    register()
    model.set_attn_implementation(ATTENTION)


@dataclass
class SequenceSampler:
    """A request's sampling state: its generator, counts for the penalties, constraint."""

    generator: torch.Generator | None
    prompt_set: frozenset[int]
    constraint: Any
    simple: bool  # greedy, no penalties, no constraint: the batch argmax is its choice
    counts: dict[int, int] = field(default_factory=dict)


class TorchBackend:
    """Sampling for both torch backends; subclasses own the cache and the forward pass."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self._model = model
        self._device = device
        self._logits: torch.Tensor | None = None

    # Paged attention reads only a sequence's own blocks: an idle cache costs the running
    # sequences nothing, so it stays where it is (no parking in host memory).
    def park_size(self, slot: int) -> int | None:
        return None

    def park(self, slot: int) -> object | None:
        return None

    def unpark(self, slot: int, state: object) -> bool:
        return False

    def forget(self, slot: int, start: int = 0) -> None:
        raise NotImplementedError

    def share(self, src: int, dst: int, length: int) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def free_tokens(self) -> int | None:
        return None

    def close(self) -> None:
        # The engine job may still sit in the worker's queue after an unload: hold nothing
        # that keeps the weights or the cache alive.
        self._logits = None
        self._model = None

    def _fits(self, chunks: Sequence[StepChunk]) -> bool:
        return True

    def _forward(self, chunks: Sequence[StepChunk]) -> torch.Tensor:
        """Logits ([n, vocab]) of the last token of each chunk that asks for them."""
        raise NotImplementedError

    def decode(self, chunks: Sequence[StepChunk]) -> bool:
        if not self._fits(chunks):
            return False
        self._logits = self._forward(chunks)
        return True

    # -- sampling state ---------------------------------------------------------------------

    def start(self, generation: Generation) -> None:
        params = generation.params
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self._device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        generation.state = SequenceSampler(
            generator=generator,
            prompt_set=frozenset(generation.history)
            if params.repetition_penalty != 1.0
            else frozenset(),
            constraint=generation.constraint,
            simple=params.greedy and not params.penalises and generation.constraint is None,
        )

    def stop(self, generation: Generation) -> None:
        return None

    def complete(self, generation: Generation) -> bool:
        constraint = generation.state.constraint
        return constraint is not None and constraint.done

    def sample(self, generations: Sequence[Generation]) -> list[int | BaseException | None]:
        logits = self._logits
        assert logits is not None and logits.shape[0] == len(generations)
        # One device-to-host transfer for every sequence: finite flags and greedy picks.
        # -inf is a legitimate mask value; NaN is what a broken step produces.
        summary = torch.stack([(~torch.isnan(logits).any(dim=-1)).long(), logits.argmax(dim=-1)])
        finite, greedy = summary.tolist()
        tokens: list[int | BaseException | None] = []
        for row, generation in enumerate(generations):
            if not finite[row]:
                tokens.append(None)
                continue
            try:
                tokens.append(self._sample_row(generation, logits, row, greedy[row]))
            except Exception as exc:  # this request's sampler or constraint: it fails alone
                if is_device_fault(exc):
                    raise
                tokens.append(exc)
        self._logits = None
        return tokens

    @staticmethod
    def _sample_row(generation: Generation, logits: torch.Tensor, row: int, greedy: int) -> int:
        state: SequenceSampler = generation.state
        params = generation.params
        if state.simple:
            token = greedy
        else:
            constraint = state.constraint
            allowed = None if constraint is None else constraint.allowed(logits.shape[-1])
            token = next_token(
                logits[row], params, state.counts, state.generator, state.prompt_set, allowed
            )
            if constraint is not None and token not in params.eos_ids:
                constraint.advance(token)
        state.counts[token] = state.counts.get(token, 0) + 1
        return token


class PagedBackend(TorchBackend):
    """Every sequence in one packed forward pass over the paged KV cache."""

    def __init__(self, model: Any, kv: PagedKv, device: torch.device) -> None:
        super().__init__(model, device)
        self._kv = kv
        self._block_offsets = torch.arange(kv.block_size, device=device)

    def forget(self, slot: int, start: int = 0) -> None:
        self._kv.forget(slot, start)

    def share(self, src: int, dst: int, length: int) -> None:
        self._kv.share(src, dst, length)

    def clear(self) -> None:
        self._kv.clear()

    def free_tokens(self) -> int | None:
        return self._kv.free_tokens()

    def close(self) -> None:
        super().close()
        self._kv.keys.clear()  # the tensors go with their last reference
        self._kv.values.clear()

    def _fits(self, chunks: Sequence[StepChunk]) -> bool:
        return self._kv.fits([(c.slot, c.start, c.start + len(c.tokens)) for c in chunks])

    def _cells(self, slot: int, length: int) -> slice | torch.Tensor:
        table = self._kv.table(slot)
        size = self._kv.block_size
        first = contiguous_start(table, length, size)
        if first is not None:
            return slice(first, first + length)
        blocks = torch.tensor(table, dtype=torch.long, device=self._device)
        return (blocks[:, None] * size + self._block_offsets).reshape(-1)[:length]

    def _forward(self, chunks: Sequence[StepChunk]) -> torch.Tensor:
        kv = self._kv
        ids: list[int] = []
        positions: list[int] = []
        write: list[int] = []
        logit_rows: list[int] = []
        prompts: list[PromptSpan] = []
        decoding: list[tuple[int, int, int]] = []  # (row, slot, length) of one-token chunks
        for chunk in chunks:
            first, end = len(ids), chunk.start + len(chunk.tokens)
            write.extend(kv.reserve(chunk.slot, chunk.start, end))
            ids.extend(chunk.tokens)
            positions.extend(range(chunk.start, end))
            if len(chunk.tokens) == 1:
                decoding.append((first, chunk.slot, end))
            else:
                prompts.append(
                    PromptSpan(first, len(chunk.tokens), chunk.start, self._cells(chunk.slot, end))
                )
            if chunk.logits:
                logit_rows.append(len(ids) - 1)
        device = self._device
        layout = StepLayout(
            kv=kv,
            write=torch.tensor(write, dtype=torch.long, device=device),
            spans=prompts,
            decode=self._decode_group(decoding),
        )
        with torch.inference_mode():
            out = self._model(
                input_ids=torch.tensor([ids], device=device),
                position_ids=torch.tensor([positions], device=device),
                use_cache=False,
                logits_to_keep=torch.tensor(logit_rows, dtype=torch.long, device=device),
                **{STEP_KWARG: layout},
            )
        return out.logits[0]

    def _decode_group(self, decoding: list[tuple[int, int, int]]) -> DecodeGroup | None:
        if not decoding:
            return None
        device = self._device
        longest = max(length for _, _, length in decoding)
        if len(decoding) == 1:
            keys = self._cells(decoding[0][1], longest)
        else:
            padded = []
            for _, slot, length in decoding:
                cells = self._cells(slot, length)
                if isinstance(cells, slice):
                    cells = torch.arange(cells.start, cells.stop, device=device)
                pad = (0, longest - length)
                padded.append(torch.nn.functional.pad(cells, pad, value=self._kv.scratch_cell))
            keys = torch.stack(padded)
        return DecodeGroup(
            rows=torch.tensor([row for row, _, _ in decoding], device=device),
            keys=keys,
            lengths=torch.tensor([length for _, _, length in decoding], device=device),
            longest=longest,
        )


class SequentialBackend(TorchBackend):
    """For models the paged attention cannot run: each sequence keeps a ``DynamicCache`` and
    runs its own forward pass within the step (no batching gain; the same scheduling and
    sampling). The cache grows with use: no fixed capacity. The engine runs it without prefix
    reuse: such models' caches (sliding windows, recurrent state) cannot all be cut back to
    a prefix."""

    def __init__(self, model: Any, device: torch.device) -> None:
        super().__init__(model, device)
        self._caches: dict[int, Any] = {}
        # transformers 5.x renamed forward's ``past_key_values`` to ``cache`` (the old name
        # warns, then goes in 5.40); 4.x knows only the old one.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def forget(self, slot: int, start: int = 0) -> None:
        self._caches.pop(slot, None)  # without prefix reuse the engine only forgets whole slots

    def share(self, src: int, dst: int, length: int) -> None:
        raise NotImplementedError("sequential decoding runs without prefix reuse")

    def clear(self) -> None:
        self._caches.clear()

    def close(self) -> None:
        super().close()
        self._caches.clear()

    def _forward(self, chunks: Sequence[StepChunk]) -> torch.Tensor:
        from transformers import DynamicCache

        rows = []
        for chunk in chunks:
            cache = self._caches.get(chunk.slot)
            if cache is None:
                cache = self._caches[chunk.slot] = DynamicCache(config=self._model.config)
            with torch.inference_mode():
                out = self._model(
                    input_ids=torch.tensor([chunk.tokens], device=self._device),
                    use_cache=True,
                    **{self._cache_arg: cache},
                    logits_to_keep=1,
                )
            if chunk.logits:
                rows.append(out.logits[0, -1])
        return torch.stack(rows) if rows else torch.empty(0)
