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

from helexa.core.errors import ApiError, bad_request, model_not_found, unavailable
from helexa.core.wire import (
    BatchInfo,
    ChatMessage,
    ModelSize,
    ModelSpec,
    ModelStatus,
    PrefixCacheInfo,
)
from helexa.neuron.devices import CPU, DevicePool, cuda_key
from helexa.neuron.harness.base import ModelGone, PreparedPrompt, TokenStream
from helexa.neuron.harness.hf import loader
from helexa.neuron.harness.hf.constraint import Grammars, JsonConstraint
from helexa.neuron.harness.hf.decode import DecodeJob
from helexa.neuron.harness.prompt import PromptFacts, prepare_chat, prepare_text
from helexa.neuron.model_files import (
    ModelFiles,
    generation_defaults,
    hf_cache_dir,
    locate,
    read_json,
)
from helexa.neuron.sampling import OutputFormat, SamplingParams
from helexa.neuron.workers import WorkerPoisoned

log = logging.getLogger("helexa.neuron.harness.transformers")

MB = 1024 * 1024
# A load is sized at 1.2 x its dense weights: the rest is KV cache and activations (§2.4).
HEADROOM = 1.2
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
    loaded: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def insufficient_memory(message: str) -> ApiError:
    return ApiError(
        409, message, type="invalid_request_error", code="insufficient_memory", param="model_id"
    )


class TransformersHarness:
    name = "transformers"

    def __init__(
        self,
        pool: DevicePool,
        *,
        hf_cache: Path | None,
        model_dirs: list[Path],
        cuda_dtype: str = "auto",
        cpu_dtype: str = "float32",
    ) -> None:
        self._pool = pool
        self._hf_cache = hf_cache
        self._model_dirs = model_dirs
        self._cuda_dtype = cuda_dtype
        self._cpu_dtype = cpu_dtype
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, str] = {}  # model_id -> device key, while a load is running

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
        return None  # one DynamicCache per request, dropped at its end

    def batch_info(self, model_id: str) -> BatchInfo | None:
        return None  # requests interleave step by step, each in its own forward pass

    def list(self) -> list[ModelStatus]:
        return [self._status(m) for m in self._models.values()]

    def loading(self) -> dict[str, str]:
        return dict(self._loading)

    # -- placement --------------------------------------------------------------------------

    async def _place(self, spec: ModelSpec, need: int) -> str:
        """The device key for a model needing ``need`` bytes, reserved there (the caller
        releases the reservation); refuses with the reason."""
        if (spec.tensor_parallel or 1) > 1 or (spec.devices and len(spec.devices) > 1):
            raise bad_request(
                "the transformers harness places a model on exactly one device; "
                "tensor_parallel and multi-device placement are not supported",
                param="devices",
            )
        if spec.devices == []:
            candidates = [CPU]
        elif spec.devices:
            index = spec.devices[0]
            if index not in self._pool.cuda_indices:
                raise bad_request(
                    f"no CUDA device {index} on this host (have {self._pool.cuda_indices})",
                    param="devices",
                )
            candidates = [cuda_key(index)]
        elif self._pool.cuda_indices:
            candidates = [cuda_key(i) for i in self._pool.cuda_indices]
        else:
            candidates = [CPU]
        healthy = [k for k in candidates if self._pool.worker(k).poisoned is None]
        if not healthy:
            raise unavailable(
                f"every candidate device is poisoned ({', '.join(candidates)}); unload and "
                "reload its models, or restart the neuron",
                code="device_poisoned",
                retry_after=30,
            )
        room = await self._pool.room(healthy)
        best = max(healthy, key=lambda k: room[k])
        if room[best] < need:
            raise insufficient_memory(
                f"not enough memory: the model needs ~{need // MB} MB, the best device "
                f"({best}) has {max(room[best], 0) // MB} MB free"
            )
        self._pool.reserve(best, need)  # no await since the room was read
        return best

    # -- lifecycle --------------------------------------------------------------------------

    async def size(self, spec: ModelSpec) -> ModelSize:
        """The dense weights in the dtype a load would pick, times ``HEADROOM``."""
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
        weights = await asyncio.to_thread(loader.estimate_bytes, files, dtype)
        total = int(weights * HEADROOM)
        return ModelSize(bytes=total, weights_bytes=weights, kv_bytes=total - weights)

    async def load(self, spec: ModelSpec) -> ModelStatus:
        model_id = spec.model_id
        started = time.monotonic()
        files: ModelFiles = await asyncio.to_thread(
            locate,
            model_id,
            spec.quant,
            cache_dir=hf_cache_dir(self._hf_cache),
            model_dirs=self._model_dirs,
        )
        config = await asyncio.to_thread(read_json, files.root / "config.json")
        if files.gguf_file is None:
            loader.check_architecture(config)
        on_cuda = bool(self._pool.cuda_indices) and spec.devices != []
        dtype = loader.pick_dtype(
            self._cuda_dtype if on_cuda else self._cpu_dtype,
            cuda=on_cuda,
            bf16_supported=on_cuda and torch.cuda.is_bf16_supported(),
        )
        need = await asyncio.to_thread(loader.estimate_bytes, files, dtype)
        key = await self._place(spec, need)  # reserves `need` on that device
        device = torch.device(key)
        self._loading[model_id] = key
        try:
            tokenizer_task = asyncio.create_task(asyncio.to_thread(loader.load_tokenizer, files))
            worker = self._pool.worker(key)
            try:
                model = await asyncio.wrap_future(
                    worker.submit(loader.load_weights, files, dtype, device)
                )
            except BaseException:
                await asyncio.gather(tokenizer_task, return_exceptions=True)
                raise
            tokenizer = await tokenizer_task
            gen_config = await asyncio.to_thread(read_json, files.root / "generation_config.json")
            self._models[model_id] = LoadedModel(
                spec=spec,
                device_key=key,
                device=device,
                model=model,
                tokenizer=tokenizer,
                bytes=loader.model_bytes(model),
                context_length=loader.context_length(config, model),
                generation_defaults=generation_defaults(gen_config),
                eos_ids=loader.eos_ids(gen_config, config, tokenizer),
                tags=loader.output_tags(tokenizer),
            )
        finally:
            self._pool.unreserve(key, need)
            self._loading.pop(model_id, None)
        loaded = self._models[model_id]
        log.info(
            "model loaded",
            extra={
                "model_id": model_id,
                "device": key,
                "dtype": str(dtype).removeprefix("torch."),
                "mb": loaded.bytes // MB,
                "secs": round(time.monotonic() - started, 3),
                "gguf": files.gguf_file,
            },
        )
        return self._status(loaded)

    async def unload(self, model_id: str) -> None:
        loaded = self.get(model_id)
        loaded.loaded = False  # running generations stop at their next step
        del self._models[model_id]
        worker = self._pool.worker(loaded.device_key)

        def release() -> None:
            loaded.model = None
            gc.collect()
            if loaded.device.type == "cuda":
                torch.cuda.empty_cache()

        try:
            if worker.poisoned is None:
                await asyncio.wrap_future(worker.submit(release))
            else:  # the device is lost anyway; drop our references so a reload can start
                loaded.model = None
                log.warning(
                    "unloaded from a poisoned device without releasing memory",
                    extra={"model_id": model_id, "device": loaded.device_key},
                )
        finally:
            loaded.tokenizer = None

    # -- inference --------------------------------------------------------------------------

    @staticmethod
    def _facts(loaded: LoadedModel) -> PromptFacts:
        return PromptFacts(
            context_length=loaded.context_length,
            generation_defaults=loaded.generation_defaults,
            eos_ids=loaded.eos_ids,
            tags=loaded.tags,
        )

    async def prepare_chat(
        self,
        model_id: str,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any] | None,
    ) -> PreparedPrompt:
        loaded = self.get(model_id)
        return await prepare_chat(
            loaded.tokenizer, self._facts(loaded), messages, tools, template_kwargs
        )

    async def prepare_text(self, model_id: str, text: str) -> PreparedPrompt:
        loaded = self.get(model_id)
        return await prepare_text(loaded.tokenizer, self._facts(loaded), text)

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

    async def prepare_format(self, model_id: str, fmt: OutputFormat) -> None:
        grammars = await self._grammars(self.get(model_id))
        if not grammars.cached(fmt):
            await asyncio.to_thread(grammars.compile, fmt)  # raises the 400 of a bad schema

    def _constraint(
        self, loaded: LoadedModel, prompt: PreparedPrompt, fmt: OutputFormat
    ) -> JsonConstraint:
        task: asyncio.Future[Grammars] | None = loaded.extra.get(GRAMMARS)
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            # prepare_format ran against a model that has since been unloaded and reloaded.
            raise ModelGone("the model was reloaded while the request waited")
        return task.result().start(
            fmt,
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
            else self._constraint(loaded, prompt, params.response_format)
        )
        stream = TokenStream(asyncio.get_running_loop())
        job = DecodeJob(
            model=loaded.model,
            tokenizer=loaded.tokenizer,
            prompt_ids=prompt.token_ids,
            params=params,
            device=loaded.device,
            emit=stream.emit,
            is_loaded=lambda: loaded.loaded,
            constraint=constraint,
        )
        stream.attach(worker.submit_stepped(job), job.cancel)
        return stream
