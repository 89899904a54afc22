"""The ``transformers`` harness: dense safetensors and GGUF, on CUDA or the CPU."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from helexa.core.errors import bad_request, model_not_found
from helexa.core.wire import (
    BatchInfo,
    ModelSize,
    ModelSpec,
    ModelStatus,
    PrefixCacheInfo,
)
from helexa.neuron.config import TransformersHarnessSettings
from helexa.neuron.devices import DevicePool
from helexa.neuron.harness.base import ModelGone, PreparedPrompt, TokenStream
from helexa.neuron.harness.compile_gate import CompileGate
from helexa.neuron.harness.engine import Engine, Generation
from helexa.neuron.harness.prompt import PromptFacts, TokenizerPrompts
from helexa.neuron.harness.transformers import loader, plan
from helexa.neuron.harness.transformers.batched import (
    PagedBackend,
    SequentialBackend,
    TorchBackend,
    kv_shape,
    use_paged_attention,
)
from helexa.neuron.harness.transformers.constraint import Grammars, JsonConstraint
from helexa.neuron.harness.transformers.paged import PagedKv, blocks_for, kv_bytes_per_token
from helexa.neuron.model_files import (
    ModelFiles,
    generation_defaults,
    hf_cache_dir,
    locate,
    read_json,
)
from helexa.neuron.sampling import OutputFormat, SamplingParams
from helexa.neuron.workers import WorkerPoisoned, is_device_fault

log = logging.getLogger("helexa.neuron.harness.transformers")

MB = 1024 * 1024
GRAMMARS = "grammars"  # LoadedModel.extra: the task building the model's llguidance Grammars


@dataclass
class LoadedModel:
    spec: ModelSpec
    device_key: str
    device: torch.device
    model: Any
    tokenizer: Any
    bytes: int
    context_length: int
    generation_defaults: dict[str, Any]
    eos_ids: frozenset[int]
    tags: frozenset[str] = frozenset()  # reasoning / tool-call tags in the vocabulary
    engine: Engine | None = None
    kv_capacity_tokens: int | None = None  # the paged KV cache; None: sequential decoding
    loaded: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class TransformersHarness(TokenizerPrompts):
    name = "transformers"

    def __init__(
        self,
        pool: DevicePool,
        *,
        settings: TransformersHarnessSettings | None = None,
        model_dirs: list[Path],
        wait_timeout_s: float | None = None,
    ) -> None:
        self._pool = pool
        self._settings = settings or TransformersHarnessSettings()
        self._hf_cache = self._settings.hf_cache
        self._model_dirs = model_dirs
        self._cuda_dtype = self._settings.cuda_dtype
        self._cpu_dtype = self._settings.cpu_dtype
        self._wait_timeout_s = wait_timeout_s
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, str] = {}  # model_id -> device key, while a load is running
        self._compiles = CompileGate()

    # -- queries ----------------------------------------------------------------------------

    def has(self, model_id: str) -> bool:
        return model_id in self._models

    def get(self, model_id: str) -> LoadedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise model_not_found(model_id) from None

    def memory_used_bytes(self, device: str) -> int:
        return sum(m.bytes for m in self._models.values() if m.device_key == device)

    def _status(self, m: LoadedModel) -> ModelStatus:
        worker = self._pool.worker(m.device_key)
        index = m.device.index if m.device.type == "cuda" else None
        return ModelStatus(
            id=m.spec.model_id,
            harness=self.name,
            status="poisoned" if worker.poisoned else "loaded",
            devices=[] if index is None else [index],
            vram_used_mb=m.bytes // MB,
            context_length=m.context_length,
        )

    def prefix_cache(self, model_id: str) -> PrefixCacheInfo | None:
        loaded = self._models.get(model_id)
        if loaded is None or loaded.engine is None or loaded.kv_capacity_tokens is None:
            return None  # sequential decoding: per-request caches, no fixed capacity
        return loaded.engine.prefix_cache_info(loaded.kv_capacity_tokens)

    def batch_info(self, model_id: str) -> BatchInfo | None:
        loaded = self._models.get(model_id)
        if loaded is None or loaded.engine is None:
            return None
        return loaded.engine.batch_info()

    def list(self) -> list[ModelStatus]:
        return [self._status(m) for m in self._models.values()]

    def loading(self) -> dict[str, str]:
        return dict(self._loading)

    # -- placement --------------------------------------------------------------------------

    async def _place(self, spec: ModelSpec, need: int) -> str:
        """The device key for a model needing ``need`` bytes, reserved there (the caller
        releases the reservation); refuses with the reason (the decisions: ``plan``)."""
        keys = plan.candidates(spec.devices, spec.tensor_parallel, self._pool.cuda_indices)
        poisoned = [k for k in keys if self._pool.worker(k).poisoned is not None]
        keys = plan.healthy(keys, poisoned)
        room = await self._pool.room(keys)
        best = plan.best_device(keys, room)
        if room[best] < need:
            capacity = {k: await self._pool.capacity_bytes(k) for k in keys}
            raise plan.refusal(need, best, room, capacity)
        self._pool.reserve(best, need)  # no await since the room was read
        return best

    # -- lifecycle --------------------------------------------------------------------------

    def _kv_budget(self, weights: int, config: dict[str, Any], dtype: torch.dtype) -> int:
        """Bytes of KV cache the load allocates: ``kv_cache_mb``; else ``kv_cache_fraction``
        of the weights, but at least one request of the model's whole trained context
        (capped at ``max_default_context_tokens``, as the llamacpp harness caps its context)
        plus a block per sequence: a prompt the model can read fits."""
        if self._settings.kv_cache_mb is not None:
            return self._settings.kv_cache_mb * MB
        budget = int(weights * self._settings.kv_cache_fraction)
        per_token = kv_bytes_per_token(config, dtype)
        if per_token:
            block = self._settings.kv_block_tokens
            context = loader.context_length(config, None)
            longest = min(context, self._settings.max_default_context_tokens)
            floor = blocks_for(longest, block) + self._settings.max_sequences
            budget = max(budget, floor * block * per_token)
        return budget

    async def _weights_bytes(self, spec: ModelSpec) -> tuple[ModelFiles, torch.dtype, int]:
        files: ModelFiles = await asyncio.to_thread(
            locate,
            spec.model_id,
            spec.quant,
            cache_dir=hf_cache_dir(self._hf_cache),
            model_dirs=self._model_dirs,
        )
        on_cuda = bool(self._pool.cuda_indices) and spec.devices != []
        dtype = loader.pick_dtype(
            self._cuda_dtype if on_cuda else self._cpu_dtype,
            cuda=on_cuda,
            bf16_supported=on_cuda and torch.cuda.is_bf16_supported(),
        )
        return files, dtype, await asyncio.to_thread(loader.estimate_bytes, files, dtype)

    async def size(self, spec: ModelSpec) -> ModelSize:
        """The dense weights in the dtype a load would pick, plus the KV cache it allocates."""
        files, dtype, weights = await self._weights_bytes(spec)
        config = await asyncio.to_thread(read_json, files.root / "config.json")
        kv = self._kv_budget(weights, config, dtype)
        return ModelSize(bytes=weights + kv, weights_bytes=weights, kv_bytes=kv)

    async def load(self, spec: ModelSpec) -> ModelStatus:
        model_id = spec.model_id
        started = time.monotonic()
        files, dtype, weights = await self._weights_bytes(spec)
        config = await asyncio.to_thread(read_json, files.root / "config.json")
        if files.gguf_file is None:
            loader.check_architecture(config)
        kv_budget = self._kv_budget(weights, config, dtype)
        need = weights + kv_budget
        key = await self._place(spec, need)  # reserves `need` on that device
        device = torch.device(key)
        self._loading[model_id] = key
        try:
            tokenizer_task = asyncio.create_task(asyncio.to_thread(loader.load_tokenizer, files))
            worker = self._pool.worker(key)
            try:
                # Off the device worker, so streams of models already on the device keep
                # going while the weights are read (on CUDA they go straight to the device).
                model = await asyncio.to_thread(loader.load_weights, files, dtype, device)
            except BaseException as exc:
                if is_device_fault(exc):
                    worker.poison(exc)
                await asyncio.gather(tokenizer_task, return_exceptions=True)
                raise
            tokenizer = await tokenizer_task
            gen_config = await asyncio.to_thread(read_json, files.root / "generation_config.json")
            trained = loader.context_length(config, model)
            backend, capacity, kv_bytes = await asyncio.wrap_future(
                worker.submit(self._backend, model, device, kv_budget)
            )
            loaded = LoadedModel(
                spec=spec,
                device_key=key,
                device=device,
                model=model,
                tokenizer=tokenizer,
                bytes=loader.model_bytes(model) + kv_bytes,
                context_length=min(trained, capacity) if capacity else trained,
                generation_defaults=generation_defaults(gen_config),
                eos_ids=loader.eos_ids(gen_config, config, tokenizer),
                tags=loader.output_tags(tokenizer),
                kv_capacity_tokens=capacity,
            )
            loaded.engine = Engine(
                backend,
                worker,
                slots=self._settings.max_sequences,
                batch_tokens=self._settings.batch_tokens,
                is_loaded=lambda: loaded.loaded,
                wait_timeout_s=self._wait_timeout_s,
                prefix_reuse=capacity is not None,
            )
            self._models[model_id] = loaded
        finally:
            self._pool.unreserve(key, need)
            self._loading.pop(model_id, None)
        log.info(
            "model loaded",
            extra={
                "model_id": model_id,
                "device": key,
                "dtype": str(dtype).removeprefix("torch."),
                "mb": loaded.bytes // MB,
                "kv_tokens": capacity,
                "batching": "paged" if capacity else "sequential",
                "secs": round(time.monotonic() - started, 3),
                "gguf": files.gguf_file,
            },
        )
        return self._status(loaded)

    def _backend(
        self, model: Any, device: torch.device, kv_budget: int
    ) -> tuple[TorchBackend, int | None, int]:
        """On the device worker: the paged KV cache where the model's attention allows it
        (its capacity in tokens and bytes), else sequential decoding."""
        shape = kv_shape(model) if self._settings.batching else None
        if shape is None:
            log.info(
                "sequential decoding: the paged attention cannot run this model",
                extra={"architecture": type(model).__name__},
            )
            return SequentialBackend(model, device), None, 0
        block = self._settings.kv_block_tokens
        blocks = max(kv_budget // (shape.bytes_per_token() * block), 1)
        try:
            kv = PagedKv(shape, blocks=blocks, block_size=block, device=device)
        except RuntimeError as exc:
            if "out of memory" not in str(exc).lower():
                raise
            raise plan.insufficient_memory(f"not enough memory for the KV cache: {exc}") from exc
        use_paged_attention(model)
        return PagedBackend(model, kv, device), kv.capacity_tokens, kv.bytes

    async def unload(self, model_id: str) -> None:
        loaded = self.get(model_id)
        loaded.loaded = False  # running generations stop at their next step
        del self._models[model_id]
        worker = self._pool.worker(loaded.device_key)
        engine = loaded.engine

        def release() -> None:
            if engine is not None:
                engine.close(ModelGone("the model was unloaded during generation"))
            loaded.engine = None
            loaded.model = None
            gc.collect()
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()

        try:
            if worker.poisoned is None:
                await asyncio.wrap_future(worker.submit(release))
            else:  # the device is lost anyway; drop our references so a reload can start
                if engine is not None:
                    engine.close(ModelGone("the model was unloaded during generation"))
                loaded.engine = None
                loaded.model = None
                log.warning(
                    "unloaded from a poisoned device without releasing memory",
                    extra={"model_id": model_id, "device": loaded.device_key},
                )
        finally:
            loaded.tokenizer = None

    # -- inference --------------------------------------------------------------------------

    def prompt_source(self, model_id: str) -> tuple[Any, PromptFacts]:
        loaded = self.get(model_id)
        facts = PromptFacts(
            context_length=loaded.context_length,
            generation_defaults=loaded.generation_defaults,
            eos_ids=loaded.eos_ids,
            tags=loaded.tags,
        )
        return loaded.tokenizer, facts

    async def _grammars(self, loaded: LoadedModel) -> Grammars:
        """The model's llguidance tokenizer, built once on first use, off the event loop."""
        task: asyncio.Future[Grammars] | None = loaded.extra.get(GRAMMARS)
        if task is None:
            vocab = int(getattr(loaded.model.config, "vocab_size", 0) or 0)
            task = asyncio.ensure_future(
                asyncio.to_thread(
                    Grammars, loaded.tokenizer, vocab_size=vocab, eos_ids=loaded.eos_ids
                )
            )
            loaded.extra[GRAMMARS] = task  # concurrent first requests share the one build
        try:
            return await asyncio.shield(task)  # a client leaving must not cancel the build
        except Exception as exc:  # e.g. a slow (non-Rust) tokenizer
            raise bad_request(
                f"structured output is not available for this model: {exc}",
                param="response_format",
                code="response_format_unsupported",
            ) from exc

    async def prepare_format(
        self, model_id: str, fmt: OutputFormat, prompt: PreparedPrompt
    ) -> object:
        grammars = await self._grammars(self.get(model_id))
        return await self._compiles.run(grammars.compile, fmt)  # a bad schema: its 400

    def _constraint(
        self, loaded: LoadedModel, prompt: PreparedPrompt, fmt: OutputFormat, prepared: object
    ) -> JsonConstraint:
        task: asyncio.Future[Grammars] | None = loaded.extra.get(GRAMMARS)
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            # prepare_format ran against a model that has since been unloaded and reloaded.
            raise ModelGone("the model was reloaded while the request waited")
        return task.result().start(
            fmt,
            matcher=prepared,
            device=loaded.device,
            prompt_ids=prompt.token_ids,
            reasoning_tags=prompt.reasoning_tags,
            opens_reasoning=prompt.opens_reasoning,
        )

    def generate(
        self, model_id: str, prompt: PreparedPrompt, params: SamplingParams
    ) -> TokenStream:
        loaded = self.get(model_id)
        worker = self._pool.worker(loaded.device_key)
        if worker.poisoned is not None:  # refuse before any response is started
            raise WorkerPoisoned(f"{worker.name} worker is poisoned: {worker.poisoned}")
        constraint = (
            None
            if params.response_format is None
            else self._constraint(loaded, prompt, params.response_format, params.prepared_format)
        )
        assert loaded.engine is not None
        stream = TokenStream(asyncio.get_running_loop())
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
