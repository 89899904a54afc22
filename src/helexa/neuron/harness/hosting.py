"""What every engine's harness does the same way, written once: the registry of loaded
models, their status, prefix-cache and batch figures, prompts, generation and unload.

An engine (``llamacpp/``, ``transformers/``) subclasses ``EngineHarness`` and supplies only
what differs: ``size`` and ``load`` (how its files are sized, placed and opened), ``release``
(what freeing a model takes on its device), and its form of ``response_format``
(``prepare_format`` and ``constraint``). The batched decode loop both share is ``engine``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from helexa.core.errors import model_not_found
from helexa.core.wire import BatchInfo, ModelSpec, ModelStatus, PrefixCacheInfo
from helexa.neuron.device_thread import WorkerPoisoned
from helexa.neuron.devices import CPU, DevicePool
from helexa.neuron.harness.base import ModelGone, PreparedPrompt, TokenStream
from helexa.neuron.harness.compile_gate import CompileGate
from helexa.neuron.harness.engine import Engine, Generation
from helexa.neuron.harness.prompt import PromptFacts, TokenizerPrompts
from helexa.neuron.sampling import OutputFormat, SamplingParams

log = logging.getLogger("helexa.neuron.harness")

MB = 1024 * 1024


@dataclass(kw_only=True)
class Loaded:
    """What every engine keeps of a loaded model."""

    spec: ModelSpec
    shares: dict[str, int]  # bytes held per device key; the first key's worker drives it
    tokenizer: Any
    context_length: int
    generation_defaults: dict[str, Any]
    eos_ids: frozenset[int]
    tags: frozenset[str] = frozenset()  # reasoning / tool-call tags in the vocabulary
    engine: Engine | None = None
    kv_capacity_tokens: int | None = None  # the shared KV cache; None: no prefix cache
    loaded: bool = True  # False once unloading: running generations stop at their next step

    @property
    def device_key(self) -> str:
        return next(iter(self.shares))

    @property
    def bytes(self) -> int:
        return sum(self.shares.values())

    @property
    def cuda_indices(self) -> list[int]:
        return [int(key.split(":")[1]) for key in self.shares if key != CPU]


M = TypeVar("M", bound=Loaded)


class EngineHarness(TokenizerPrompts, Generic[M]):
    name: str

    def __init__(self, pool: DevicePool) -> None:
        self._pool = pool
        self._models: dict[str, M] = {}
        self._loading: dict[str, str] = {}  # model id -> device key, while its load runs
        # Schemas compile in threads, a few at a time: a burst of new schemas must not take
        # every executor thread (or core) from the loads and requests beside them.
        self._compiles = CompileGate()
        # Where a generation's text goes: a stream for this process's event loop, or (in a
        # device worker process) one that sends it to the neuron from the device thread.
        self.new_stream: Callable[[], TokenStream] = lambda: TokenStream(asyncio.get_running_loop())

    # -- queries ----------------------------------------------------------------------------

    def has(self, model_id: str) -> bool:
        return model_id in self._models

    def get(self, model_id: str) -> M:
        try:
            return self._models[model_id]
        except KeyError:
            raise model_not_found(model_id) from None

    def memory_used_bytes(self, device: str) -> int:
        return sum(m.shares.get(device, 0) for m in self._models.values())

    def status(self, m: M) -> ModelStatus:
        return ModelStatus(
            id=m.spec.model_id,
            harness=self.name,
            status="poisoned" if self._pool.worker(m.device_key).poisoned else "loaded",
            devices=m.cuda_indices,
            vram_used_mb=m.bytes // MB,
            context_length=m.context_length,
            rpc=m.spec.rpc or None,
            local_mb=m.bytes // MB if m.spec.rpc else None,
        )

    def list(self) -> list[ModelStatus]:
        return [self.status(m) for m in self._models.values()]

    def loading(self) -> dict[str, str]:
        return dict(self._loading)

    def prefix_cache(self, model_id: str) -> PrefixCacheInfo | None:
        loaded = self._models.get(model_id)
        if loaded is None or loaded.engine is None or loaded.kv_capacity_tokens is None:
            return None  # no shared cache (sequential decoding): nothing to report
        return loaded.engine.prefix_cache_info(loaded.kv_capacity_tokens)

    def batch_info(self, model_id: str) -> BatchInfo | None:
        loaded = self._models.get(model_id)
        if loaded is None or loaded.engine is None:
            return None
        return loaded.engine.batch_info()

    def prompt_source(self, model_id: str) -> tuple[Any, PromptFacts]:
        loaded = self.get(model_id)
        facts = PromptFacts(
            context_length=loaded.context_length,
            generation_defaults=loaded.generation_defaults,
            eos_ids=loaded.eos_ids,
            tags=loaded.tags,
        )
        return loaded.tokenizer, facts

    # -- what each engine supplies ----------------------------------------------------------

    async def prepare_format(
        self, model_id: str, fmt: OutputFormat, prompt: PreparedPrompt
    ) -> object:
        raise NotImplementedError

    def constraint(self, loaded: M, prompt: PreparedPrompt, params: SamplingParams) -> object:
        """The engine's form of ``params.response_format`` for one generation, from what
        ``prepare_format`` made (``params.prepared_format``)."""
        raise NotImplementedError

    def release(self, loaded: M) -> None:
        """On the device worker: free the model (its engine is already closed)."""
        raise NotImplementedError

    def release_poisoned(self, loaded: M) -> None:
        """After a device fault: drop what can be dropped without touching the device."""
        log.warning(
            "unloaded from a poisoned device without releasing memory",
            extra={"model_id": loaded.spec.model_id, "device": loaded.device_key},
        )

    async def quiesce(self, loaded: M) -> None:
        """Before release: wait for work outside the engine still reading the model."""

    # -- generation and unload --------------------------------------------------------------

    def generate(
        self, model_id: str, prompt: PreparedPrompt, params: SamplingParams
    ) -> TokenStream:
        loaded = self.get(model_id)
        worker = self._pool.worker(loaded.device_key)
        if worker.poisoned is not None:  # refuse before any response is started
            raise WorkerPoisoned(f"{worker.name} worker is poisoned: {worker.poisoned}")
        constraint = None
        if params.response_format is not None:
            constraint = self.constraint(loaded, prompt, params)
        assert loaded.engine is not None
        stream = self.new_stream()
        generation = Generation(
            prompt_ids=prompt.token_ids,
            params=params,
            tokenizer=loaded.tokenizer,
            emit=stream.emit,
            constraint=constraint,
        )
        stream.attach(generation.future, generation.cancel)
        loaded.engine.submit(generation)
        return stream

    async def unload(self, model_id: str) -> None:
        loaded = self.get(model_id)
        loaded.loaded = False  # running generations end at their next step
        del self._models[model_id]
        await self.quiesce(loaded)
        engine, loaded.engine = loaded.engine, None

        def release() -> None:
            if engine is not None:
                engine.close(ModelGone("the model was unloaded during generation"))
            self.release(loaded)

        worker = self._pool.worker(loaded.device_key)
        try:
            if worker.poisoned is None:
                await asyncio.wrap_future(worker.submit(release))
                return
            if engine is not None:
                engine.close(ModelGone("the model was unloaded during generation"))
            self.release_poisoned(loaded)
        finally:
            loaded.tokenizer = None
