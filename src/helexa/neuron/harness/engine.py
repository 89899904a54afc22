"""The batched decode loop of one model, run step by step on its device's worker.

Every running request of a model advances in the same forward pass: one token per decoding
sequence plus bounded chunks of prompts still being read (chunked prefill). Requests join and
leave between steps. Decisions (which slot, what goes in a step, what to give up when the KV
cache is full) are the pure functions in ``slots``; the engine-specific half — the KV cache,
the batched forward, sampling — is a ``Backend`` (llama.cpp's context, or the transformers
engine's paged cache). Both harnesses share this loop, so admission, preemption, prefix reuse,
cancellation and fault handling behave the same on either.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from helexa.core.errors import bad_request, internal, unavailable
from helexa.core.wire import BatchInfo, PrefixCacheInfo
from helexa.neuron.detokenize import IncrementalDetokenizer, StopMatcher, flush_held
from helexa.neuron.device_thread import (
    DeviceWorker,
    NanLogitsFlood,
    WorkerPoisoned,
    is_device_fault,
)
from helexa.neuron.harness.base import Finish, FinishReason, ModelGone
from helexa.neuron.harness.slots import (
    ParkedView,
    SlotChoice,
    SlotView,
    choose_slot,
    make_room,
    plan_parking,
    plan_step,
    to_park,
)
from helexa.neuron.sampling import SamplingParams

log = logging.getLogger("helexa.neuron.engine")

PROMPT_TAIL_TOKENS = 6
NAN_STEPS_TO_POISON = 3  # consecutive steps with non-finite logits: the device is not trusted


@dataclass
class EngineStats:
    hits: int = 0  # prompts that reused cached tokens
    misses: int = 0
    reused: int = 0  # prompt tokens not evaluated thanks to the cache
    evaluated: int = 0  # prompt tokens evaluated
    steps: int = 0
    tokens: int = 0
    peak_sequences: int = 0
    preempted: int = 0  # sequences pushed back to wait because the KV cache was full
    timed_out: int = 0  # requests that waited longer than the wait limit for KV room


class Generation:
    """One request: its tokens so far, sampling state and where its text goes."""

    def __init__(
        self,
        *,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        emit: Callable[[str], None],
        constraint: Any = None,
    ) -> None:
        self.history = list(prompt_ids)  # prompt + sampled tokens
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        self.constraint = constraint  # the backend's form of response_format, if any
        self.emit = emit
        self.future: Future[Finish] = Future()
        self.detok = IncrementalDetokenizer(tokenizer, prompt_tail=prompt_ids[-PROMPT_TAIL_TOKENS:])
        self.stops = StopMatcher(params.stop)
        self.state: Any = None  # the backend's sampling state, from the first admission on
        self.generated = 0
        self.cancelled = False
        self.slot: int | None = None
        self.pending: list[int] = []  # tokens to evaluate before the next sample
        self.admitted = 0
        self.queued_at = time.monotonic()
        self.first_token_at = 0.0

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine before its next step (one token at most)


@dataclass(frozen=True)
class StepChunk:
    """Tokens of one sequence in a forward pass."""

    slot: int
    tokens: list[int]
    start: int  # position of the first token (the slot's cached length)
    logits: bool  # the last token's logits are wanted: the sequence samples after this step


class Backend(Protocol):
    """The engine-specific half: a slotted KV cache, the batched forward and sampling. Every
    method runs on the device worker."""

    def forget(self, slot: int, start: int = 0) -> None:
        """Drop the slot's cache from position ``start`` on."""
        ...

    def share(self, src: int, dst: int, length: int) -> None:
        """Give ``dst`` (empty) the first ``length`` positions of ``src``'s cache."""
        ...

    def clear(self) -> None: ...

    def start(self, generation: Generation) -> None:
        """Set ``generation.state`` up for sampling (first admission only)."""
        ...

    def stop(self, generation: Generation) -> None:
        """Release ``generation.state``."""
        ...

    def decode(self, chunks: Sequence[StepChunk]) -> bool:
        """One forward pass; False (nothing changed) when the KV cache has no room for it."""
        ...

    def sample(self, generations: Sequence[Generation]) -> list[int | BaseException | None]:
        """The next token of each generation whose chunk asked for logits in the last
        ``decode``, in that order; None where its logits were not finite; the exception where
        sampling that one request failed (its constraint, its penalties): it fails alone.
        A device fault is raised, never returned."""
        ...

    def complete(self, generation: Generation) -> bool:
        """Constrained output is complete after the token just sampled: end as at EOS."""
        ...

    def free_tokens(self) -> int | None:
        """KV positions not held by any slot; None where the cache cannot tell."""
        ...

    def park_size(self, slot: int) -> int | None:
        """Bytes a host-memory copy of the slot's cache takes, where idle caches slow the
        running sequences and are better kept off the device; None where they do not (the
        engine then parks nothing)."""
        ...

    def park(self, slot: int) -> object | None:
        """The host-memory copy of the slot's cache (``park_size`` bytes); None if it could
        not be made (the cache is left as it is)."""
        ...

    def unpark(self, slot: int, state: object) -> bool:
        """Put a parked cache into the (empty) slot; False when there is no room for it."""
        ...

    def close(self) -> None: ...


@dataclass
class Parked:
    """A slot's cache kept in host memory while other sequences run."""

    tokens: list[int]
    state: object
    size: int  # bytes
    last_used: int


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
        self,
        backend: Backend,
        worker: DeviceWorker,
        *,
        slots: int,
        batch_tokens: int,
        is_loaded: Callable[[], bool],
        wait_timeout_s: float | None = None,
        prefix_reuse: bool = True,
        park_budget_bytes: int = 0,
    ) -> None:
        self._backend = backend
        self._prefix_reuse = prefix_reuse
        self._park_budget = park_budget_bytes if prefix_reuse else 0
        self._parked: dict[int, Parked] = {}  # the worker's; the loop reads _parked_now
        self._parked_now: tuple[Parked, ...] = ()
        self._park_keys = itertools.count(1)
        self._worker = worker
        self._is_loaded = is_loaded
        self._slots = [Slot(i) for i in range(slots)]
        self._budget = batch_tokens
        self._wait_timeout_s = wait_timeout_s
        self._inbox: list[Generation] = []
        self._waiting: deque[Generation] = deque()
        self._lock = threading.Lock()
        self._running = False
        self._epoch = 0  # counts stepped jobs: a late _stopped must not touch a newer one
        self._tick = itertools.count(1)
        self._nan_steps = 0
        self._full = False  # a sequence was preempted: admit nothing until one finishes
        self.stats = EngineStats()

    # -- loop side ------------------------------------------------------------------------------

    def submit(self, generation: Generation) -> None:
        if not generation.history:  # nothing to compute the first token's logits from
            _fail(generation, bad_request("the prompt is empty", param="prompt"))
            return
        with self._lock:
            self._inbox.append(generation)
            if self._running:
                return
            self._running = True
            self._epoch += 1
            epoch = self._epoch
        future = self._worker.submit_stepped(self)
        future.add_done_callback(lambda done: self._stopped(done, epoch))

    def _stopped(self, future: Future[None], epoch: int) -> None:
        """The stepped job ``epoch`` ended. A step that raised has already failed its
        requests and marked the engine idle (a request submitted since then started a new
        job, which this must not touch); left to do here: a job the worker refused or
        failed before it stepped (poisoned), whose requests get that error."""
        exc = future.exception()
        if exc is None:
            return
        with self._lock:
            if not self._running or epoch != self._epoch:
                return
            self._running = False
            doomed = [*self._waiting, *self._inbox]
            self._waiting.clear()
            self._inbox = []
            # Requests mid-generation too (the worker was poisoned under them, e.g. by
            # another model's fault): the job will not step again. Their slots are let go
            # without the backend, which must not touch a poisoned device.
            for slot in self._slots:
                if slot.owner is not None:
                    doomed.append(slot.owner)
                    slot.owner.slot = None
                    slot.owner.state = None
                    slot.owner = None
        for generation in doomed:
            _fail(generation, exc)

    def prefix_cache_info(self, capacity_tokens: int) -> PrefixCacheInfo:
        # Read off the worker thread: figures may be a step apart, never torn objects.
        slots = list(self._slots)
        parked = self._parked_now
        stats = self.stats
        return PrefixCacheInfo(
            capacity_tokens=capacity_tokens,
            cached_tokens=sum(len(s.cached) for s in slots),
            hits=stats.hits,
            misses=stats.misses,
            prompt_tokens_reused=stats.reused,
            prompt_tokens_evaluated=stats.evaluated,
            running_tokens=sum(len(s.cached) for s in slots if s.owner is not None),
            free_tokens=self._backend.free_tokens(),
            parked_tokens=sum(len(p.tokens) for p in parked),
            parked_bytes=sum(p.size for p in parked),
        )

    def batch_info(self) -> BatchInfo:
        stats = self.stats
        return BatchInfo(
            steps=stats.steps,
            tokens=stats.tokens,
            peak_sequences=stats.peak_sequences,
            preempted=stats.preempted,
            kv_wait_timeouts=stats.timed_out,
        )

    # -- worker side ----------------------------------------------------------------------------

    def result(self) -> None:
        return None

    def step(self) -> bool:
        if not self._is_loaded():
            with self._lock:
                self._waiting.extend(self._inbox)
                self._inbox = []
            self._fail_all(ModelGone("the model was unloaded during generation"))
            return self._go_idle()
        try:
            self._take_inbox()
            self._drop_cancelled()
            self._admit()
            self._expire_waiting()
            if not self._run_step():
                return self._go_idle()
            return False
        except BaseException as exc:
            # A step-wide failure (the forward pass, the cache): every request of the model
            # shares it. (One request's own failure never gets here: _request_failed.)
            fault = is_device_fault(exc)
            error: BaseException = exc
            if fault:  # poisoned first: whoever sees a request fail sees the poison
                self._worker.poison(exc)
                error = WorkerPoisoned(f"{self._worker.name} worker is poisoned: {exc}")
            with self._lock:  # idle from here: a request arriving now starts a new job
                self._running = False
                self._waiting.extend(self._inbox)
                self._inbox = []
            self._fail_all(error)
            if fault:
                raise  # the worker poisons itself and rejects every later job
            log.error("engine step failed", exc_info=exc)
            if self._is_loaded():
                self._backend.clear()
                for slot in self._slots:
                    slot.cached.clear()
                self._parked.clear()  # saved from a cache now in doubt
                self._parked_now = ()
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
        now = time.monotonic()
        for generation in arrived:
            generation.queued_at = now
        self._waiting.extend(arrived)

    def _drop_cancelled(self) -> None:
        for generation in [g for g in self._waiting if g.cancelled]:
            self._waiting.remove(generation)
            self._finish(generation, "cancelled")
        for slot in self._slots:
            if slot.owner is not None and slot.owner.cancelled:
                self._finish(slot.owner, "cancelled")

    def _expire_waiting(self) -> None:
        """A request that never started and has waited too long for KV room gets a 503 (its
        client retries, or goes to another replica) rather than waiting without end."""
        if self._wait_timeout_s is None:
            return
        deadline = time.monotonic() - self._wait_timeout_s
        for generation in [g for g in self._waiting if not g.generated and g.queued_at < deadline]:
            self._waiting.remove(generation)
            self.stats.timed_out += 1
            self._release(generation)
            _fail(
                generation,
                unavailable(
                    f"waited {self._wait_timeout_s:g}s for room in the model's KV cache",
                    code="kv_cache_full",
                    retry_after=max(1, round(self._wait_timeout_s)),
                ),
            )

    def _admit(self) -> None:
        admitted = False
        while self._waiting and not self._full:
            generation = self._waiting[0]
            parked = [ParkedView(k, p.tokens, p.last_used) for k, p in self._parked.items()]
            choice = choose_slot(generation.history, [s.view() for s in self._slots], parked)
            if choice is None:
                break
            if not self._prefix_reuse:
                choice = SlotChoice(slot=choice.slot, reuse=0)
            self._waiting.popleft()
            first = generation.state is None  # not a resumed preemption
            if first and not self._start(generation):
                continue  # that request failed alone; the slot stays free
            admitted = True
            slot = self._slots[choice.slot]
            if choice.restore is not None:
                self._backend.forget(slot.index)
                slot.cached = []
                entry = self._parked[choice.restore]
                if self._backend.unpark(slot.index, entry.state):
                    if choice.reuse >= len(entry.tokens) - 1:  # its conversation goes on
                        del self._parked[choice.restore]
                        self._parked_now = tuple(self._parked.values())
                    # else only a shared opening (a system prompt) is taken: the parked copy
                    # stays for the conversation it belongs to
                    slot.cached = list(entry.tokens)
                    self._backend.forget(slot.index, choice.reuse)
                    del slot.cached[choice.reuse :]
                else:  # no room for it now: evaluated in full, the parked copy kept
                    choice = SlotChoice(slot=choice.slot, reuse=0)
            elif choice.copy_from is not None:
                self._backend.forget(slot.index)
                self._backend.share(choice.copy_from, slot.index, choice.reuse)
                slot.cached = list(generation.history[: choice.reuse])
            else:
                self._backend.forget(slot.index, choice.reuse)
                del slot.cached[choice.reuse :]
            if first:
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
        if admitted and self._park_budget:
            self._park_idle()

    def _park_idle(self) -> None:
        """Idle caches to host memory before the admitted prompts take cells (so they land
        low in the cache and the running sequences attend over their own cells only), the
        most recently used first within the budget."""
        idle = []
        for index in to_park([s.view() for s in self._slots]):
            size = self._backend.park_size(index)
            if size is not None:
                idle.append((index, size, self._slots[index].last_used))
        if not idle:
            return
        entries = [(k, p.size, p.last_used) for k, p in self._parked.items()]
        park, drop = plan_parking(idle, entries, self._park_budget)
        for key in drop:
            del self._parked[key]
        sizes = {index: size for index, size, _used in idle}
        for index in park:
            slot = self._slots[index]
            state = self._backend.park(index)
            if state is None:
                continue  # it stays in the cache
            self._parked[next(self._park_keys)] = Parked(
                slot.cached, state, sizes[index], slot.last_used
            )
            self._backend.forget(index)
            slot.cached = []
        self._parked_now = tuple(self._parked.values())  # one swap: the loop reads it whole

    def _start(self, generation: Generation) -> bool:
        """Set the request's sampling state up; False (and the request failed) if that
        raised for it alone."""
        try:
            self._backend.start(generation)
        except Exception as exc:
            if is_device_fault(exc):
                raise
            generation.state = None
            self._request_failed(generation, exc, "starting")
            return False
        return True

    def _request_failed(self, generation: Generation, exc: BaseException, stage: str) -> None:
        """One request raised while being handled on its own (its sampler, constraint,
        detokenizer, stream): it fails with that error; the rest of the batch carries on."""
        log.warning(
            "request failed",
            extra={"stage": stage, "error": f"{type(exc).__name__}: {exc}"},
            exc_info=exc,
        )
        self._finish_error(generation, exc)

    def _run_step(self) -> bool:
        """One forward pass over every running sequence; False when there is nothing to run."""
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
            plan = plan_step(decoding, prefilling, self._budget)  # type: ignore[arg-type]
            chunks: list[StepChunk] = []
            for item in plan:
                slot = self._slots[item.key]
                generation = slot.owner
                assert generation is not None
                chunks.append(
                    StepChunk(
                        slot=slot.index,
                        tokens=generation.pending[: item.count],
                        start=len(slot.cached),
                        logits=item.count == len(generation.pending),
                    )
                )
            if self._backend.decode(chunks):
                break
            room = make_room([s.view() for s in self._slots], frozenset(c.slot for c in chunks))
            if room is None:  # alone and still too big: only the cache size can fix this
                error = internal(
                    "the KV cache cannot hold this request; give the model a larger KV cache",
                    code="kv_cache_full",
                )
                for chunk in chunks:
                    owner = self._slots[chunk.slot].owner
                    if owner is not None:
                        self._finish_error(owner, error)
                return True
            self._free(room.slot, preempt=room.preempt)
            running = [s.owner for s in self._slots if s.owner is not None]
        self.stats.steps += 1
        self.stats.tokens += sum(len(c.tokens) for c in chunks)
        self.stats.peak_sequences = max(self.stats.peak_sequences, len(chunks))
        sampling: list[Generation] = []
        for chunk in chunks:
            slot = self._slots[chunk.slot]
            generation = slot.owner
            assert generation is not None
            slot.cached.extend(chunk.tokens)
            del generation.pending[: len(chunk.tokens)]
            if generation.generated == 0:
                self.stats.evaluated += len(chunk.tokens)
            if chunk.logits:
                sampling.append(generation)
        self._sample(sampling)
        return True

    def _free(self, index: int, *, preempt: bool) -> None:
        slot = self._slots[index]
        self._backend.forget(index)
        slot.cached.clear()
        if preempt and slot.owner is not None:
            generation = slot.owner
            slot.owner = None
            generation.slot = None
            generation.pending = []
            generation.queued_at = time.monotonic()  # its wait for room starts now
            self._waiting.appendleft(generation)  # first to come back once there is room
            self._full = True
            self.stats.preempted += 1
            log.info(
                "sequence preempted: KV cache full",
                extra={"tokens": len(generation.history), "generated": generation.generated},
            )

    def _sample(self, generations: list[Generation]) -> None:
        if not generations:
            return
        tokens = self._backend.sample(generations)
        bad = 0
        for generation, token in zip(generations, tokens, strict=True):
            if isinstance(token, BaseException):
                self._request_failed(generation, token, "sampling")
                continue
            if token is None:
                bad += 1
                self._finish_error(
                    generation, internal("the model produced NaN logits", code="nan_logits")
                )
                continue
            try:
                self._advance(generation, token)
            except Exception as exc:
                if is_device_fault(exc):
                    raise
                self._request_failed(generation, exc, "emitting its output")
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
        if generation.generated == 1:
            generation.first_token_at = time.perf_counter()
        text = generation.stops.push(generation.detok.push(token))
        if text:
            generation.emit(text)
        if generation.stops.matched is not None:
            self._finish(generation, "stop", generation.stops.matched)
        elif self._backend.complete(generation):  # a constrained document is complete
            self._finish(generation, "stop", self._flush(generation))
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
        if generation.slot is not None:
            self._full = False  # its cells are free to be reused
            slot = self._slots[generation.slot]
            slot.owner = None
            slot.last_used = next(self._tick)
            generation.slot = None
        if generation.state is not None:
            self._backend.stop(generation)
            generation.state = None

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
        if generation.generated > 1 and log.isEnabledFor(logging.DEBUG):
            rate = (generation.generated - 1) / (time.perf_counter() - generation.first_token_at)
            log.debug(
                "generation done",
                extra={"reason": reason, "tokens": generation.generated, "decode_tok_s": rate},
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
        if generation.slot is not None:  # its cells may hold the bad state: free them now
            self._backend.forget(generation.slot)
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
        worker before the backend's model is freed (unload)."""
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox = []
        self._fail_all(exc)
        self._parked.clear()
        self._parked_now = ()
        self._backend.close()


def _fail(generation: Generation, exc: BaseException) -> None:
    if not generation.future.done():
        generation.future.set_exception(exc)
