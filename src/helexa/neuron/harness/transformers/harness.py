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

from helexa.core.errors import bad_request
from helexa.core.wire import ModelSize, ModelSpec, ModelStatus
from helexa.neuron.config import TransformersHarnessSettings
from helexa.neuron.device_thread import is_device_fault
from helexa.neuron.devices import DevicePool, candidates
from helexa.neuron.harness.base import ModelGone, PreparedPrompt
from helexa.neuron.harness.engine import Engine
from helexa.neuron.harness.hosting import EngineHarness, Loaded
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

log = logging.getLogger("helexa.neuron.harness.transformers")

MB = 1024 * 1024
GRAMMARS = "grammars"  # LoadedModel.extra: the task building the model's llguidance Grammars


@dataclass(kw_only=True)
class LoadedModel(Loaded):
    device: torch.device
    model: Any
    extra: dict[str, Any] = field(default_factory=dict)


class TransformersHarness(EngineHarness[LoadedModel]):
    name = "transformers"

    def __init__(
        self,
        pool: DevicePool,
        *,
        settings: TransformersHarnessSettings | None = None,
        model_dirs: list[Path],
        wait_timeout_s: float | None = None,
    ) -> None:
        super().__init__(pool)
        self._settings = settings or TransformersHarnessSettings()
        self._hf_cache = self._settings.hf_cache
        self._model_dirs = model_dirs
        self._cuda_dtype = self._settings.cuda_dtype
        self._cpu_dtype = self._settings.cpu_dtype
        self._wait_timeout_s = wait_timeout_s
        # One load reads weights at a time: two at once (a reload after a crash and a load
        # by hand) broke in transformers' meta-device init ("Cannot copy out of meta tensor").
        self._weights_lock = asyncio.Lock()

    # -- placement --------------------------------------------------------------------------

    async def _place(self, spec: ModelSpec, need: int) -> str:
        """The device key for a model needing ``need`` bytes, reserved there (the caller
        releases the reservation); refuses with the reason (the decisions: ``plan``)."""
        keys = candidates(spec.devices, spec.tensor_parallel, self._pool.cuda_indices)
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
                async with self._weights_lock:  # transformers' loading is not thread-safe
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
                shares={key: loader.model_bytes(model) + kv_bytes},
                device=device,
                model=model,
                tokenizer=tokenizer,
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
        return self.status(loaded)

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

    def release(self, loaded: LoadedModel) -> None:
        loaded.model = None
        gc.collect()
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    def release_poisoned(self, loaded: LoadedModel) -> None:
        loaded.model = None  # the device is lost anyway; drop our references
        super().release_poisoned(loaded)

    # -- inference --------------------------------------------------------------------------

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

    def constraint(
        self, loaded: LoadedModel, prompt: PreparedPrompt, params: SamplingParams
    ) -> JsonConstraint:
        task: asyncio.Future[Grammars] | None = loaded.extra.get(GRAMMARS)
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            # prepare_format ran against a model that has since been unloaded and reloaded.
            raise ModelGone("the model was reloaded while the request waited")
        assert params.response_format is not None
        return task.result().start(
            params.response_format,
            matcher=params.prepared_format,
            device=loaded.device,
            prompt_ids=prompt.token_ids,
            reasoning_tags=prompt.reasoning_tags,
            opens_reasoning=prompt.opens_reasoning,
        )
