"""The batched decode loop of one llama.cpp model, run step by step on its device's worker.

Every running request of the model advances in the same ``llama_decode`` call: one token per
decoding sequence plus bounded chunks of prompts still being read. Requests join and leave
between steps. Decisions (which slot, what goes in a step, what to give up when the KV cache is
full) are the pure functions in ``slots``; this module carries them out.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from helexa.core.errors import internal
from helexa.neuron.detokenize import IncrementalDetokenizer, StopMatcher, flush_held
from helexa.neuron.harness.base import Finish, FinishReason, ModelGone
from helexa.neuron.harness.llamacpp.binding import Batch, Context, Model, Sampler
from helexa.neuron.harness.llamacpp.slots import (
    SlotView,
    choose_slot,
    make_room,
    plan_step,
)
from helexa.neuron.harness.llamacpp.tokenizer import GgufTokenizer
from helexa.neuron.sampling import SamplingParams
from helexa.neuron.workers import DeviceWorker, NanLogitsFlood, is_device_fault

log = logging.getLogger("helexa.neuron.llamacpp")

PROMPT_TAIL_TOKENS = 6
NAN_STEPS_TO_POISON = 3  # consecutive steps with non-finite logits: the device is not trusted


@dataclass
class Runtime:
    """A loaded model as the engine sees it; its pointers are touched only on the worker."""

    model: Model
    ctx: Context
    tokenizer: GgufTokenizer
    context_length: int
    loaded: bool = True


@dataclass
class EngineStats:
    hits: int = 0  # prompts that reused cached tokens
    misses: int = 0
    reused: int = 0  # prompt tokens not evaluated thanks to the cache
    evaluated: int = 0  # prompt tokens evaluated
    steps: int = 0
    tokens: int = 0
    peak_sequences: int = 0


class Generation:
    """One request: its tokens so far, sampling state and where its text goes."""

    def __init__(
        self,
        *,
        prompt_ids: list[int],
        params: SamplingParams,
        grammar: str | None,
        tokenizer: GgufTokenizer,
        emit: Callable[[str], None],
    ) -> None:
        self.history = list(prompt_ids)  # prompt + sampled tokens
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self.grammar = grammar
        self.emit = emit
        self.future: Future[Finish] = Future()
        self.detok = IncrementalDetokenizer(tokenizer, prompt_tail=prompt_ids[-PROMPT_TAIL_TOKENS:])
        self.stops = StopMatcher(params.stop)
        self.sampler: Sampler | None = None
        self.generated = 0
        self.cancelled = False
        self.slot: int | None = None
        self.pending: list[int] = []  # tokens to evaluate before the next sample
        self.admitted = 0

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine before its next step (one token at most)


@dataclass
class Slot:
    index: int
    cached: list[int] = field(default_factory=list)
    owner: Generation | None = None
    last_used: int = 0

    def view(self) -> SlotView:
        return SlotView(
            index=self.index,
            cached=self.cached,
            busy=self.owner is not None,
            last_used=self.last_used,
            admitted=self.owner.admitted if self.owner is not None else 0,
        )


class Engine:
    """A ``SteppedJob`` that runs while the model has work and ends when it has none; the
    next request submits it again."""

    def __init__(
        self, runtime: Runtime, worker: DeviceWorker, *, slots: int, batch_tokens: int
    ) -> None:
        self._rt = runtime
        self._worker = worker
        self._slots = [Slot(i) for i in range(slots)]
        self._batch = Batch(batch_tokens, slots)
        self._budget = batch_tokens
        self._inbox: list[Generation] = []
        self._waiting: deque[Generation] = deque()
        self._lock = threading.Lock()
        self._running = False
        self._tick = itertools.count(1)
        self._nan_steps = 0
        self._full = False  # a sequence was preempted: admit nothing until one finishes
        self.stats = EngineStats()

    # -- loop side ------------------------------------------------------------------------------

    def submit(self, generation: Generation) -> None:
        with self._lock:
            self._inbox.append(generation)
            if self._running:
                return
            self._running = True
        future = self._worker.submit_stepped(self)
        future.add_done_callback(self._stopped)

    def _stopped(self, future: Future[None]) -> None:
        exc = future.exception()
        if exc is not None:  # the worker refused the job (poisoned) or a step raised
            with self._lock:
                self._running = False
                self._waiting.extend(self._inbox)
                self._inbox = []
            self._fail_all(exc)

    def cached_tokens(self) -> int:
        return sum(len(s.cached) for s in self._slots)

    # -- worker side ----------------------------------------------------------------------------

    def result(self) -> None:
        return None

    def step(self) -> bool:
        if not self._rt.loaded:
            self._fail_all(ModelGone("the model was unloaded during generation"))
            return self._go_idle()
        try:
            self._take_inbox()
            self._drop_cancelled()
            self._admit()
            if not self._run_step():
                return self._go_idle()
            return False
        except BaseException as exc:
            with self._lock:
                self._running = False
            if is_device_fault(exc):
                # The worker poisons itself when this re-raises, then fails this job with
                # WorkerPoisoned; _stopped passes that on to every request.
                raise
            self._fail_all(exc)
            if self._rt.loaded:
                self._rt.ctx.clear()
                for slot in self._slots:
                    slot.cached.clear()
            raise

    def _go_idle(self) -> bool:
        with self._lock:
            if self._inbox:
                return False  # arrived meanwhile: keep going
            self._running = False
            return True

    def _take_inbox(self) -> None:
        with self._lock:
            arrived, self._inbox = self._inbox, []
        self._waiting.extend(arrived)

    def _drop_cancelled(self) -> None:
        for generation in [g for g in self._waiting if g.cancelled]:
            self._waiting.remove(generation)
            self._finish(generation, "cancelled")
        for slot in self._slots:
            if slot.owner is not None and slot.owner.cancelled:
                self._finish(slot.owner, "cancelled")

    def _admit(self) -> None:
        while self._waiting and not self._full:
            generation = self._waiting[0]
            choice = choose_slot(generation.history, [s.view() for s in self._slots])
            if choice is None:
                return
            self._waiting.popleft()
            slot = self._slots[choice.slot]
            ctx = self._rt.ctx
            if choice.copy_from is not None:
                ctx.forget(slot.index)
                ctx.share(choice.copy_from, slot.index, choice.reuse)
                slot.cached = list(generation.history[: choice.reuse])
            else:
                ctx.forget(slot.index, choice.reuse)
                del slot.cached[choice.reuse :]
            if generation.sampler is None:  # first admission (not a resumed preemption)
                generation.sampler = Sampler(
                    generation.params,
                    vocab=self._rt.model.vocab,
                    context_length=self._rt.context_length,
                    grammar=generation.grammar,
                    prompt=generation.history,
                )
                if choice.reuse:
                    self.stats.hits += 1
                else:
                    self.stats.misses += 1
                self.stats.reused += choice.reuse
            generation.pending = generation.history[choice.reuse :]
            generation.slot = slot.index
            generation.admitted = next(self._tick)
            slot.owner = generation
            slot.last_used = generation.admitted

    def _run_step(self) -> bool:
        """One llama_decode over every running sequence; False when there is nothing to run."""
        running = [s.owner for s in self._slots if s.owner is not None]
        if not running:
            return False
        while True:
            decoding = [g.slot for g in running if g.generated and len(g.pending) == 1]
            prefilling = [
                (g.slot, len(g.pending))
                for g in running
                if not (g.generated and len(g.pending) == 1)
            ]
            chunks = plan_step(decoding, prefilling, self._budget)  # type: ignore[arg-type]
            self._batch.clear()
            outputs: dict[int, int] = {}  # slot -> batch index of its logits
            for chunk in chunks:
                slot = self._slots[chunk.key]
                generation = slot.owner
                assert generation is not None
                tokens = generation.pending[: chunk.count]
                last = chunk.count == len(generation.pending)
                index = self._batch.add(slot.index, tokens, len(slot.cached), logits_last=last)
                if last:
                    outputs[slot.index] = index
            if self._rt.ctx.decode(self._batch):
                break
            room = make_room([s.view() for s in self._slots], frozenset(c.key for c in chunks))
            if room is None:  # alone and still too big: only the cache size can fix this
                error = internal(
                    "the KV cache cannot hold this request; raise context_tokens",
                    code="kv_cache_full",
                )
                for chunk in chunks:
                    owner = self._slots[chunk.key].owner
                    if owner is not None:
                        self._finish_error(owner, error)
                return True
            self._free(room.slot, preempt=room.preempt)
            running = [s.owner for s in self._slots if s.owner is not None]
        self.stats.steps += 1
        self.stats.tokens += self._batch.n_tokens
        self.stats.peak_sequences = max(self.stats.peak_sequences, len(chunks))
        for chunk in chunks:
            slot = self._slots[chunk.key]
            generation = slot.owner
            assert generation is not None
            fed = generation.pending[: chunk.count]
            slot.cached.extend(fed)
            del generation.pending[: chunk.count]
            if generation.generated == 0:
                self.stats.evaluated += len(fed)
        self._sample(outputs)
        return True

    def _free(self, index: int, *, preempt: bool) -> None:
        slot = self._slots[index]
        self._rt.ctx.forget(index)
        slot.cached.clear()
        if preempt and slot.owner is not None:
            generation = slot.owner
            slot.owner = None
            generation.slot = None
            generation.pending = []
            self._waiting.appendleft(generation)  # first to come back once there is room
            self._full = True
            log.info(
                "sequence preempted: KV cache full",
                extra={"tokens": len(generation.history), "generated": generation.generated},
            )

    def _sample(self, outputs: dict[int, int]) -> None:
        ctx = self._rt.ctx
        bad = 0
        for index, batch_index in outputs.items():
            generation = self._slots[index].owner
            assert generation is not None and generation.sampler is not None
            token = generation.sampler.sample(ctx, batch_index)
            if not ctx.logit_finite(batch_index, token):
                bad += 1
                self._finish_error(
                    generation, internal("the model produced NaN logits", code="nan_logits")
                )
                continue
            self._advance(generation, token)
        self._nan_steps = self._nan_steps + 1 if bad else 0
        if self._nan_steps >= NAN_STEPS_TO_POISON:
            raise NanLogitsFlood(f"{self._nan_steps} consecutive steps produced NaN logits")

    def _advance(self, generation: Generation, token: int) -> None:
        params = generation.params
        if token in params.eos_ids:
            self._finish(generation, "stop", self._flush(generation))
            return
        generation.history.append(token)
        generation.pending = [token]
        generation.generated += 1
        text = generation.stops.push(generation.detok.push(token))
        if text:
            generation.emit(text)
        if generation.stops.matched is not None:
            self._finish(generation, "stop", generation.stops.matched)
        elif generation.generated >= params.max_new_tokens:
            matched = self._flush(generation)
            self._finish(generation, "stop" if matched else "length", matched)

    @staticmethod
    def _flush(generation: Generation) -> str | None:
        tail = flush_held(generation.detok, generation.stops)
        if tail:
            generation.emit(tail)
        return generation.stops.matched

    def _release(self, generation: Generation) -> None:
        self._full = False  # its cells are free to be reused
        if generation.slot is not None:
            slot = self._slots[generation.slot]
            slot.owner = None
            slot.last_used = next(self._tick)
            generation.slot = None
        if generation.sampler is not None:
            generation.sampler.free()
            generation.sampler = None

    def _finish(
        self, generation: Generation, reason: FinishReason, stop_sequence: str | None = None
    ) -> None:
        self._release(generation)
        if reason == "cancelled":
            log.info(
                "generation cancelled",
                extra={
                    "completion_tokens": generation.generated,
                    "max_tokens": generation.params.max_new_tokens,
                },
            )
        if not generation.future.done():
            generation.future.set_result(
                Finish(
                    reason=reason,
                    prompt_tokens=generation.prompt_tokens,
                    completion_tokens=generation.generated,
                    stop_sequence=stop_sequence,
                )
            )

    def _finish_error(self, generation: Generation, exc: BaseException) -> None:
        if generation.slot is not None:  # its cells may hold the bad state
            self._rt.ctx.forget(generation.slot)
            self._slots[generation.slot].cached.clear()
        self._release(generation)
        _fail(generation, exc)

    def _fail_all(self, exc: BaseException) -> None:
        for slot in self._slots:
            if slot.owner is not None:
                generation = slot.owner
                self._release(generation)
                _fail(generation, exc)
        while self._waiting:
            _fail(self._waiting.popleft(), exc)

    def close(self, exc: BaseException) -> None:
        """End every request with ``exc`` and free what the engine allocated; runs on the
        worker before the context and the model are freed (unload)."""
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox = []
        self._fail_all(exc)
        self._batch.free()


def _fail(generation: Generation, exc: BaseException) -> None:
    if not generation.future.done():
        generation.future.set_exception(exc)
