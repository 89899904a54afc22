"""The ``llamacpp`` harness: GGUF files run quantized by llama.cpp, batched, with prefix reuse.

Memory is the file (memory-mapped, never dequantized) plus a KV cache fixed at load and shared
by the model's sequences. Concurrent requests decode together in one batch per step
(``harness.engine.Engine``); a finished request's tokens stay cached in its slot for the next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helexa.core.errors import ApiError, bad_request, unavailable
from helexa.core.wire import (
    ModelSize,
    ModelSpec,
    ModelStatus,
)
from helexa.neuron.config import LlamaCppHarnessSettings
from helexa.neuron.devices import CPU, DevicePool, model_too_large
from helexa.neuron.gguf_header import ArrayField, read_header
from helexa.neuron.harness.base import ModelGone, PreparedPrompt
from helexa.neuron.harness.engine import Engine
from helexa.neuron.harness.hosting import EngineHarness, Loaded
from helexa.neuron.harness.llamacpp import binding, plan, rpc
from helexa.neuron.harness.llamacpp.backend import LlamaBackend, Runtime
from helexa.neuron.harness.llamacpp.tokenizer import GgufTokenizer, chat_template
from helexa.neuron.model_files import (
    ModelFiles,
    as_ids,
    generation_defaults,
    hf_cache_dir,
    locate_gguf,
    read_json,
)
from helexa.neuron.output_parser import CALL_OPEN, THINK_CLOSE, THINK_OPEN
from helexa.neuron.sampling import OutputFormat, SamplingParams
from helexa.neuron.weights_check import GGUF_READ_ERRORS, check_gguf, unreadable_gguf

log = logging.getLogger("helexa.neuron.harness.llamacpp")

MB = 1024 * 1024
GRAMMAR_CACHE = 32


@dataclass(kw_only=True)
class LoadedGguf(Loaded):
    files: ModelFiles
    placement: plan.Placement
    runtime: Runtime
    grammars: dict[tuple[OutputFormat, str], str] = field(default_factory=dict)  # GBNF
    compiling: int = 0  # grammar parses under way: they read the vocabulary unload frees


class LlamaCppHarness(EngineHarness[LoadedGguf]):
    name = "llamacpp"

    def __init__(
        self,
        pool: DevicePool,
        *,
        settings: LlamaCppHarnessSettings,
        hf_cache: Path | None,
        model_dirs: list[Path],
        cpu_threads: int | None,
        wait_timeout_s: float | None = None,
    ) -> None:
        super().__init__(pool)
        self._wait_timeout_s = wait_timeout_s
        self._settings = settings
        self._hf_cache = hf_cache
        self._model_dirs = model_dirs
        self._threads = cpu_threads
        log.info("llama.cpp CPU kernels", extra={"build": binding.describe_build()})

    # -- lifecycle --------------------------------------------------------------------------

    def _worker_keys(self) -> list[str]:
        return [CPU, *(f"cuda:{i}" for i in self._pool.cuda_indices)]

    async def size(self, spec: ModelSpec) -> ModelSize:
        """The file(s) plus the KV cache a load allocates, from the GGUF header alone."""
        files = await asyncio.to_thread(
            locate_gguf,
            spec.model_id,
            spec.quant,
            cache_dir=hf_cache_dir(self._hf_cache),
            model_dirs=self._model_dirs,
        )
        path = files.root / (files.gguf_file or "")
        sizes = await asyncio.to_thread(_gguf_sizes, path, self._settings)
        return ModelSize(
            bytes=sizes.file_bytes + sizes.kv_bytes,
            weights_bytes=sizes.file_bytes,
            kv_bytes=sizes.kv_bytes,
        )

    async def load(self, spec: ModelSpec) -> ModelStatus:
        model_id = spec.model_id
        started = time.monotonic()
        files = await asyncio.to_thread(
            locate_gguf,
            model_id,
            spec.quant,
            cache_dir=hf_cache_dir(self._hf_cache),
            model_dirs=self._model_dirs,
        )
        path = files.root / (files.gguf_file or "")
        wants_gpu = spec.devices != [] and bool(self._pool.cuda_indices)
        if wants_gpu and not binding.gpu_offload_supported():
            raise bad_request(
                "llama-cpp-python on this host was built without GPU support; reinstall it "
                "with CUDA (scripts/dev.sh does where it finds nvcc and a GPU), or load with "
                "devices: []",
                param="devices",
                code="gpu_offload_unavailable",
            )
        sizes = await asyncio.to_thread(_gguf_sizes, path, self._settings)
        need = sizes.file_bytes + sizes.kv_bytes
        pool: plan.PoolSplit | None = None
        if spec.rpc:
            placement, pool = await self._pooled(spec, sizes, need)
        else:
            placement = await self._placement(spec, need)
        for key, share in zip(placement.keys, placement.share, strict=True):
            self._pool.reserve(key, share)  # no await since the room was read
        self._loading[model_id] = placement.keys[0]
        worker = self._pool.worker(placement.keys[0])
        try:
            runtime, tokenizer = await asyncio.wrap_future(
                worker.submit(
                    self._open,
                    path,
                    files.root,
                    placement,
                    sizes.context_tokens,
                    None if pool is None else (pool, [r.endpoint for r in spec.rpc or []]),
                )
            )
            gen_config = await asyncio.to_thread(read_json, files.root / "generation_config.json")
            eos = await asyncio.to_thread(_eos_ids, runtime.model.vocab, gen_config)
            loaded = LoadedGguf(
                spec=spec,
                shares=dict(zip(placement.keys, placement.share, strict=True)),
                files=files,
                placement=placement,
                runtime=runtime,
                tokenizer=tokenizer,
                context_length=runtime.context_length,
                kv_capacity_tokens=runtime.ctx.n_ctx,
                generation_defaults=generation_defaults(gen_config),
                eos_ids=eos,
                tags=frozenset(
                    tag
                    for tag in (THINK_OPEN, THINK_CLOSE, CALL_OPEN, "</tool_call>")
                    if tokenizer.single_token(tag) is not None
                ),
            )
            loaded.engine = Engine(
                LlamaBackend(
                    runtime, batch_tokens=self._settings.batch_tokens, slots=self._settings.slots
                ),
                worker,
                slots=self._settings.slots,
                batch_tokens=self._settings.batch_tokens,
                is_loaded=lambda: loaded.loaded,
                wait_timeout_s=self._wait_timeout_s,
                park_budget_bytes=self._settings.host_cache_mb * MB,
            )
            self._models[model_id] = loaded
        finally:
            for key, share in zip(placement.keys, placement.share, strict=True):
                self._pool.unreserve(key, share)
            self._loading.pop(model_id, None)
        log.info(
            "model loaded",
            extra={
                "model_id": model_id,
                "device": ",".join(placement.keys),
                "gguf": files.gguf_file,
                "mb": need // MB,
                "file_mb": sizes.file_bytes // MB,
                "kv_mb": sizes.kv_bytes // MB,
                "context": sizes.context_tokens,
                "slots": self._settings.slots,
                "tensor_split": list(pool.tensor_split if pool else placement.tensor_split) or None,
                "rpc": ",".join(r.endpoint for r in spec.rpc or []) or None,
                "secs": round(time.monotonic() - started, 3),
            },
        )
        return self.status(loaded)

    async def _placement(self, spec: ModelSpec, need: int) -> plan.Placement:
        """Where a model on this host's devices goes (the room read now)."""
        keys = self._worker_keys() if spec.devices != [] else [CPU]
        asked = [f"cuda:{i}" for i in spec.devices or [] if i in self._pool.cuda_indices]
        sick = [k for k in asked if self._pool.worker(k).poisoned is not None]
        healthy = [k for k in keys if self._pool.worker(k).poisoned is None]
        if sick or not healthy:
            raise unavailable(
                f"{'the device asked for' if sick else 'every candidate device'} is poisoned "
                f"({', '.join(sick or keys)}); unload and reload its models, or restart the "
                "neuron",
                code="device_poisoned",
                retry_after=30,
            )
        room = await self._pool.room(healthy)
        room.update({k: -1 for k in keys if k not in healthy})
        usable = [i for i in self._pool.cuda_indices if f"cuda:{i}" in healthy]
        try:
            return plan.place(
                devices=spec.devices,
                tensor_parallel=spec.tensor_parallel,
                cuda_indices=self._pool.cuda_indices if spec.devices else usable,
                room=room,
                need=need,
            )
        except ApiError as exc:
            if exc.code != "insufficient_memory":
                raise
            capacity = {k: await self._pool.capacity_bytes(k) for k in healthy}
            most, where = plan.most_ever(
                devices=spec.devices,
                tensor_parallel=spec.tensor_parallel,
                cuda_indices=usable,
                capacity=capacity,
            )
            if need > most:
                raise model_too_large(need, most, where) from None
            raise

    async def _pooled(
        self, spec: ModelSpec, sizes: GgufSizes, need: int
    ) -> tuple[plan.Placement, plan.PoolSplit]:
        """A pooled model's split (docs/pooling.md): this host's share on one local device,
        the rest over the donors' RPC servers, each checked reachable first (ggml aborts the
        process when a connect fails)."""
        assert spec.rpc
        if not rpc.available():
            raise bad_request(
                "llama-cpp-python here was built without ggml's RPC backend: reinstall it with "
                "scripts/dev.sh setup",
                param="rpc",
                code="rpc_unavailable",
            )
        for remote in spec.rpc:
            why = await asyncio.to_thread(rpc.reachable, remote.endpoint)
            if why is not None:
                raise unavailable(
                    f"the donor at {remote.endpoint} cannot be reached: {why}",
                    code="donor_unreachable",
                    retry_after=5,
                )
        keys = self._worker_keys() if spec.devices != [] else [CPU]
        if spec.devices:
            keys = [f"cuda:{spec.devices[0]}"]
        room = await self._pool.room(keys)
        key = max(keys, key=lambda k: (k != CPU, room[k]))  # a GPU first, then the most room
        pool = plan.pool_split(
            n_layer=sizes.n_layer,
            need=need,
            remote_mb=[r.mb for r in spec.rpc],
            local_mb=spec.local_mb,
            local_gpu=key != CPU,
        )
        if room[key] < pool.local_bytes:
            raise plan.insufficient_memory(
                f"not enough memory for this host's share of the pooled model: "
                f"~{pool.local_bytes // MB} MB, {key} has {max(room[key], 0) // MB} MB free"
            )
        return plan.Placement(keys=(key,), share=(pool.local_bytes,)), pool

    def _open(
        self,
        path: Path,
        root: Path,
        placement: plan.Placement,
        n_ctx: int,
        pool: tuple[plan.PoolSplit, list[str]] | None = None,
    ) -> tuple[Runtime, GgufTokenizer]:
        """On the device worker: weights, context, tokenizer."""
        gpu = None
        if pool is not None:
            split, endpoints = pool
            try:
                devices = rpc.remote_devices(endpoints)
            except rpc.RpcUnavailable as exc:
                raise unavailable(str(exc), code="pool_load_failed", retry_after=5) from exc
            if not placement.on_cpu:
                devices.append(rpc.local_device(gpu=True))
            gpu = binding.GpuPlacement(
                main_gpu=0,
                tensor_split=split.tensor_split,
                n_gpu_layers=split.n_gpu_layers,
                devices=tuple(devices),
                # The output layer here, not on the last donor: logits stay off the wire.
                buffer_overrides=rpc.output_on_cpu() if placement.on_cpu else None,
            )
        elif not placement.on_cpu:
            gpu = binding.GpuPlacement(
                main_gpu=placement.cuda_indices[0],
                tensor_split=placement.tensor_split,
                n_gpu_layers=self._settings.n_gpu_layers,
            )
        try:
            model = binding.Model(path, gpu)
        except (ValueError, rpc.RpcUnavailable) as exc:
            if pool is not None:  # a donor refused an allocation, or exports nothing usable
                raise unavailable(
                    f"loading over the donors failed: {exc}", code="pool_load_failed", retry_after=5
                ) from exc
            raise bad_request(str(exc), param="model_id", code="unsupported_model") from exc
        if pool is not None:
            rpc.keep_alive_connections(pool[1])
        try:
            ctx = binding.Context(
                model,
                n_ctx=n_ctx,
                n_batch=self._settings.batch_tokens,
                n_seq_max=self._settings.slots,
                threads=self._threads,
                flash_attn=self._settings.flash_attn,
            )
        except MemoryError as exc:
            model.free()
            raise plan.insufficient_memory(str(exc)) from exc
        tokenizer = GgufTokenizer(model.vocab, chat_template(root, model))
        return Runtime(model=model, ctx=ctx, tokenizer=tokenizer, context_length=ctx.n_ctx), (
            tokenizer
        )

    async def quiesce(self, loaded: LoadedGguf) -> None:
        while loaded.compiling:  # a parse reading this vocabulary: bounded, let it end
            await asyncio.sleep(0.01)

    def release(self, loaded: LoadedGguf) -> None:
        loaded.runtime.ctx.free()
        loaded.runtime.model.free()

    def release_poisoned(self, loaded: LoadedGguf) -> None:
        if not loaded.placement.on_cpu:  # a faulted CUDA context is not touched: llama.cpp
            super().release_poisoned(loaded)  # aborts the process on CUDA errors
            return
        # A poisoned CPU worker (NaN flood) runs nothing more, and host memory is sound:
        # free it here.
        try:
            self.release(loaded)
        except Exception as exc:
            log.warning(
                "releasing a model from a poisoned worker failed",
                extra={"model_id": loaded.spec.model_id, "error": f"{type(exc).__name__}: {exc}"},
            )

    # -- inference --------------------------------------------------------------------------

    async def prepare_format(
        self, model_id: str, fmt: OutputFormat, prompt: PreparedPrompt
    ) -> binding.Grammar:
        loaded = self.get(model_id)
        reasoning = self._reasoning_mode(loaded, prompt)
        loaded.compiling += 1
        try:
            return await self._compiles.run(self._grammar, loaded, fmt, reasoning)
        finally:
            loaded.compiling -= 1

    def _grammar(self, loaded: LoadedGguf, fmt: OutputFormat, reasoning: str) -> binding.Grammar:
        """``fmt`` parsed for one request (the GBNF text is cached per model); a 400 when the
        schema cannot be one. Runs in a compile thread (``prepare_format``)."""
        if not loaded.loaded:  # unloaded while this waited its turn
            raise ModelGone("the model was unloaded while the request waited")
        key = (fmt, reasoning)
        text = loaded.grammars.get(key)
        try:
            gbnf = text or binding.json_grammar(fmt, reasoning)
            grammar = binding.Grammar(loaded.runtime.model.vocab, gbnf)
        except Exception as exc:
            raise bad_request(
                f"response_format: the JSON schema cannot be enforced: {exc}",
                param="response_format",
                code="invalid_schema",
            ) from exc
        if text is None:
            while len(loaded.grammars) >= GRAMMAR_CACHE:  # two compile threads may both evict
                with contextlib.suppress(KeyError, StopIteration, RuntimeError):
                    loaded.grammars.pop(next(iter(loaded.grammars)))
            loaded.grammars[key] = gbnf
        return grammar

    def _reasoning_mode(self, loaded: LoadedGguf, prompt: PreparedPrompt) -> str:
        if prompt.opens_reasoning:
            return "open"
        if not prompt.reasoning_tags:
            return "none"
        tail = loaded.tokenizer.decode(prompt.token_ids[-4:], skip_special_tokens=False)
        return "none" if tail.rstrip().endswith(THINK_CLOSE) else "optional"

    def constraint(
        self, loaded: LoadedGguf, prompt: PreparedPrompt, params: SamplingParams
    ) -> binding.Grammar:
        grammar = params.prepared_format
        if isinstance(grammar, binding.Grammar) and grammar.vocab is not loaded.runtime.model.vocab:
            # Parsed for a copy of the model that has since been unloaded and reloaded.
            raise ModelGone("the model was reloaded while the request waited")
        if isinstance(grammar, binding.Grammar):
            return grammar
        assert params.response_format is not None  # a caller that skipped prepare_format
        return self._grammar(loaded, params.response_format, self._reasoning_mode(loaded, prompt))


@dataclass(frozen=True)
class GgufSizes:
    file_bytes: int
    kv_bytes: int
    context_tokens: int
    n_layer: int


def _gguf_sizes(path: Path, settings: LlamaCppHarnessSettings) -> GgufSizes:
    """Weights as stored (every part of a split file) plus the KV cache the context needs,
    read from the GGUF header without loading tensors."""
    if not path.is_file():
        raise ApiError(
            404,
            f"the GGUF file {path.name} is missing",
            type="not_found_error",
            code="model_weights_not_found",
            param="model_id",
        )
    parts = _split_parts(path) or [path]
    for part in parts:
        check_gguf(part)
    try:
        header = read_header(path)
    except GGUF_READ_ERRORS as exc:
        raise unreadable_gguf(path, exc) from None
    size = path.stat().st_size
    if size < header.data_end:
        raise unreadable_gguf(
            path, EOFError(f"{size} bytes; its header describes {header.data_end}")
        )

    def value(key: str) -> Any:
        entry = header.fields.get(key)
        return None if isinstance(entry, ArrayField) else entry  # per-layer arrays: unknown

    arch = value("general.architecture") or ""
    n_layer = int(value(f"{arch}.block_count") or 0)
    n_head = int(value(f"{arch}.attention.head_count") or 1)
    n_head_kv = value(f"{arch}.attention.head_count_kv")
    n_head_kv = int(n_head_kv if n_head_kv is not None else n_head)
    n_embd = int(value(f"{arch}.embedding_length") or 0)
    head_k = int(value(f"{arch}.attention.key_length") or (n_embd // max(n_head, 1)))
    head_v = int(value(f"{arch}.attention.value_length") or head_k)
    trained = int(value(f"{arch}.context_length") or 0)
    tokens = plan.context_tokens(
        trained, settings.context_tokens, settings.max_default_context_tokens
    )
    return GgufSizes(
        file_bytes=sum(p.stat().st_size for p in parts),
        kv_bytes=plan.kv_bytes(
            tokens, n_layer=n_layer, n_head_kv=n_head_kv, head_k=head_k, head_v=head_v
        ),
        context_tokens=tokens,
        n_layer=n_layer,
    )


def _split_parts(path: Path) -> list[Path]:
    from helexa.neuron.model_files import SPLIT_PART

    if not SPLIT_PART.search(path.name):
        return []
    stem = SPLIT_PART.sub("", path.name)
    return sorted(p for p in path.parent.glob(f"{stem}-*-of-*.gguf") if SPLIT_PART.search(p.name))


def _eos_ids(vocab: binding.Vocab, generation_config: dict[str, Any]) -> frozenset[int]:
    """Every id that ends generation: llama.cpp's end-of-generation set and the repo's."""
    ids = {t for t in range(vocab.n_tokens) if vocab.is_eog(t)}
    ids |= as_ids(generation_config.get("eos_token_id"))
    return frozenset(ids)
