"""The engine seam: what every harness offers and what generation yields.

Callers (the HTTP layer, activation, shutdown) only see ``Harness`` and
``TokenStream``; further engines (llama.cpp, diffusion, …) plug in here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from helexa.core.wire import (
    BatchInfo,
    ChatMessage,
    ModelSize,
    ModelSpec,
    ModelStatus,
    PrefixCacheInfo,
)
from helexa.neuron.sampling import OutputFormat, SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]


class ModelGone(RuntimeError):
    """The model was unloaded while a generation was still running on it."""


class EngineCrashed(RuntimeError):
    """The worker process running the model died (a signal, an abort, an OOM kill): what it
    had in flight is lost; the neuron restarts it and reloads its models."""


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt rendered and tokenized for one model, plus what sampling needs to know."""

    token_ids: list[int]
    context_length: int
    generation_defaults: dict[str, Any]
    eos_ids: frozenset[int]
    reasoning_tags: bool = False  # the model writes <think>…</think>
    tool_call_tags: bool = False  # the model writes <tool_call>…</tool_call>
    opens_reasoning: bool = False  # the rendered prompt already opened <think>


class Harness(Protocol):
    name: str

    async def load(self, spec: ModelSpec) -> ModelStatus: ...

    async def unload(self, model_id: str) -> None: ...

    async def size(self, spec: ModelSpec) -> ModelSize:
        """The memory ``load(spec)`` would take, from the files alone (found as a load finds
        them; nothing is loaded). Missing weights: the load's 404 ``model_weights_not_found``."""
        ...

    def list(self) -> list[ModelStatus]: ...

    def has(self, model_id: str) -> bool: ...

    def loading(self) -> dict[str, str]:
        """Loads in progress: model id -> the device key it is being placed on."""
        ...

    async def prepare_chat(
        self,
        model_id: str,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any] | None,
    ) -> PreparedPrompt: ...

    async def prepare_text(self, model_id: str, text: str) -> PreparedPrompt: ...

    async def prepare_format(
        self, model_id: str, fmt: OutputFormat, prompt: PreparedPrompt
    ) -> object:
        """Build what constrains ``generate`` to ``fmt`` (``SamplingParams.response_format``)
        for this model and prompt, off the event loop and off the device worker; the caller
        passes it back as ``SamplingParams.prepared_format``. A 400 naming
        ``response_format`` if it cannot be honoured. Awaited before the response starts, so
        a bad schema never surfaces mid-stream."""
        ...

    def generate(
        self, model_id: str, prompt: PreparedPrompt, params: SamplingParams
    ) -> TokenStream: ...

    def memory_used_bytes(self, device: str) -> int: ...

    def prefix_cache(self, model_id: str) -> PrefixCacheInfo | None:
        """The model's KV cache as a prefix cache (capacity, hits); None where the harness
        keeps none."""
        ...

    def batch_info(self, model_id: str) -> BatchInfo | None:
        """How the model's decode steps were shared; None where requests decode alone."""
        ...


class TokenStream:
    """Text deltas of one generation, produced on a device thread, consumed on the loop.

    Pieces and the end travel through ``call_soon_threadsafe`` in the order the device
    thread produced them, so nothing emitted before the end can be lost. A slow
    consumer gets everything that piled up in one batch (one wake-up, not one per token).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pieces: list[str] = []
        self._wakeup = asyncio.Event()
        self._future: Future[Finish] | None = None
        self._ended = False
        self._cancel_hook: Callable[[], None] | None = None
        self._aborted: BaseException | None = None
        self.finish: Finish | None = None

    # -- producer side (device thread) --------------------------------------------------------

    def emit(self, text: str) -> None:
        self._loop.call_soon_threadsafe(self._deliver, text)

    def _deliver(self, text: str) -> None:
        self._pieces.append(text)
        self._wakeup.set()

    def deliver(self, pieces: list[str]) -> None:
        """Text produced elsewhere (a worker process), handed over on the loop."""
        self._pieces.extend(pieces)
        self._wakeup.set()

    def _end(self) -> None:
        self._ended = True
        self._wakeup.set()

    def attach(self, future: Future[Finish], cancel_hook: Callable[[], None]) -> None:
        self._future = future
        self._cancel_hook = cancel_hook
        future.add_done_callback(lambda _f: self._loop.call_soon_threadsafe(self._end))

    # -- consumer side (event loop) ---------------------------------------------------------

    def cancel(self) -> None:
        """Ask the device thread to stop before its next token."""
        if self._cancel_hook is not None:
            self._cancel_hook()

    def abort(self, exc: BaseException) -> None:
        """End the stream on the loop side now (the drain deadline): what arrived so far is
        still returned, then ``next_batch`` raises ``exc``, whatever the generation does
        next; it is asked to stop. A stream whose end was already seen is left alone."""
        if self._ended or self._aborted is not None:
            return
        self._aborted = exc
        self._wakeup.set()
        self.cancel()

    async def next_batch(self, timeout: float | None = None) -> list[str] | None:
        """Text pieces that arrived since the last call, waiting for at least one.

        Returns ``None`` when ``timeout`` passes with nothing new (time for a keep-alive).
        Once the generation ended, returns the last pieces (maybe none) and sets
        ``finish``; raises what the generation raised.
        """
        assert self._future is not None, "stream not attached to a job"
        while not self._pieces and not self._ended and self._aborted is None:
            try:  # asyncio.timeout: wait_for may swallow a racing cancellation on 3.11
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return None
            self._wakeup.clear()
        pieces, self._pieces = self._pieces, []
        if self._aborted is not None and self.finish is None:
            if pieces:
                return pieces
            raise self._aborted
        if self._ended and self.finish is None:
            if pieces and self._future.exception() is not None:
                return pieces  # text produced before the failure first; the error next call
            self.finish = self._future.result()
        return pieces

    async def settled(self, timeout: float) -> Finish | None:
        """How the generation ended, for the books once its answer is over (the client
        left, a drain cut it): a cancelled generation stops before its next token, so this
        waits at most ``timeout`` for the device thread to say how many it made. None when
        it failed or is still running then. Consumes nothing."""
        if self.finish is not None:
            return self.finish
        if self._future is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                while not self._ended:
                    await self._wakeup.wait()
                    self._wakeup.clear()
        except TimeoutError:
            return None
        future = self._future
        if future.cancelled() or future.exception() is not None:
            return None
        return future.result()

    async def __aiter__(self) -> AsyncIterator[list[str]]:
        while self.finish is None:
            pieces = await self.next_batch()
            if pieces:
                yield pieces
