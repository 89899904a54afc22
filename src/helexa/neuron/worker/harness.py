"""An engine as the neuron's main process sees it: the ``Harness`` contract, served by the
device workers. Status queries read what the workers last reported (never a round trip);
everything else is one call to the worker holding the model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from helexa.core.wire import (
    BatchInfo,
    ChatMessage,
    ModelSize,
    ModelSpec,
    ModelStatus,
    PrefixCacheInfo,
)
from helexa.neuron.harness.base import PreparedPrompt, TokenStream
from helexa.neuron.sampling import OutputFormat, SamplingParams
from helexa.neuron.worker.supervisor import Workers


class WorkerHarness:
    def __init__(self, name: str, workers: Workers, free_mb: Callable[[], dict[str, int]]) -> None:
        self.name = name
        self._workers = workers
        self._free_mb = free_mb  # () -> {device key: free MB}, for the load order

    async def load(self, spec: ModelSpec) -> ModelStatus:
        return await self._workers.load(self.name, spec, self._free_mb())

    async def unload(self, model_id: str) -> None:
        await self._workers.unload(model_id)

    async def size(self, spec: ModelSpec) -> ModelSize:
        return await self._workers.size(self.name, spec, self._free_mb())

    def list(self) -> list[ModelStatus]:
        return self._workers.statuses(self.name)

    def has(self, model_id: str) -> bool:
        return self._workers.has(self.name, model_id)

    def loading(self) -> dict[str, str]:
        return self._workers.loading(self.name)

    async def prepare_chat(
        self,
        model_id: str,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None,
        template_kwargs: dict[str, Any] | None,
    ) -> PreparedPrompt:
        return await self._workers.call(model_id, "prepare_chat", messages, tools, template_kwargs)

    async def prepare_text(self, model_id: str, text: str) -> PreparedPrompt:
        return await self._workers.call(model_id, "prepare_text", text)

    async def prepare_format(
        self, model_id: str, fmt: OutputFormat, prompt: PreparedPrompt
    ) -> object:
        """A handle to the grammar the worker prepared (and keeps for the ``generate``)."""
        return await self._workers.call(model_id, "prepare_format", fmt, prompt)

    def generate(
        self, model_id: str, prompt: PreparedPrompt, params: SamplingParams
    ) -> TokenStream:
        return self._workers.generate(model_id, prompt, params)

    def memory_used_bytes(self, device: str) -> int:
        return self._workers.memory_used_bytes(self.name, device)

    def prefix_cache(self, model_id: str) -> PrefixCacheInfo | None:
        return self._workers.figure(self.name, model_id, "prefix")

    def batch_info(self, model_id: str) -> BatchInfo | None:
        return self._workers.figure(self.name, model_id, "batch")
