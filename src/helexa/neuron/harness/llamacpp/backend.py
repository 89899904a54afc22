"""The llama.cpp half of the batched engine (``harness.engine.Backend``): the context's unified
KV cache as slots (sequence ids), ``llama_decode`` as the forward pass, llama.cpp's samplers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from helexa.neuron.device_thread import is_device_fault
from helexa.neuron.harness.engine import Generation, StepChunk
from helexa.neuron.harness.llamacpp.binding import Batch, Context, Model, Sampler
from helexa.neuron.harness.llamacpp.tokenizer import GgufTokenizer


@dataclass
class Runtime:
    """A loaded model as the engine sees it; its pointers are touched only on the worker."""

    model: Model
    ctx: Context
    tokenizer: GgufTokenizer
    context_length: int


class LlamaBackend:
    def __init__(self, runtime: Runtime, *, batch_tokens: int, slots: int) -> None:
        self._rt = runtime
        self._batch = Batch(batch_tokens, slots)
        self._outputs: list[int] = []  # batch indices of the logits the last decode kept

    def forget(self, slot: int, start: int = 0) -> None:
        self._rt.ctx.forget(slot, start)

    def share(self, src: int, dst: int, length: int) -> None:
        self._rt.ctx.share(src, dst, length)

    def clear(self) -> None:
        self._rt.ctx.clear()

    # With one unified KV cache every decode attends over all cells in use, so an idle
    # conversation's cells slow the running ones: they wait in host memory instead.
    def park_size(self, slot: int) -> int | None:
        return self._rt.ctx.sequence_state_size(slot)

    def park(self, slot: int) -> object | None:
        return self._rt.ctx.save_sequence(slot)

    def unpark(self, slot: int, state: object) -> bool:
        return self._rt.ctx.restore_sequence(slot, state)  # type: ignore[arg-type]

    def start(self, generation: Generation) -> None:
        generation.state = Sampler(
            generation.params,
            vocab=self._rt.model.vocab,
            context_length=self._rt.context_length,
            grammar=generation.constraint,
            prompt=generation.history,
        )

    def stop(self, generation: Generation) -> None:
        generation.state.free()

    def decode(self, chunks: Sequence[StepChunk]) -> bool:
        self._batch.clear()
        outputs = []
        for chunk in chunks:
            index = self._batch.add(chunk.slot, chunk.tokens, chunk.start, logits_last=chunk.logits)
            if chunk.logits:
                outputs.append(index)
        if not self._rt.ctx.decode(self._batch):
            return False
        self._outputs = outputs
        return True

    def sample(self, generations: Sequence[Generation]) -> list[int | BaseException | None]:
        ctx = self._rt.ctx
        tokens: list[int | BaseException | None] = []
        for generation, index in zip(generations, self._outputs, strict=True):
            try:
                token = generation.state.sample(ctx, index)
                tokens.append(token if ctx.logit_finite(index, token) else None)
            except Exception as exc:  # this request's sampler: it fails alone
                if is_device_fault(exc):
                    raise
                tokens.append(exc)
        return tokens

    def complete(self, generation: Generation) -> bool:
        return False  # the grammar sampler leaves only end-of-generation once a document is done

    def free_tokens(self) -> int | None:
        return None

    def close(self) -> None:
        self._batch.free()
