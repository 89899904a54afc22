"""Wire types shared by cortex and neuron: defined once, validated by pydantic."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- model lifecycle --------------------------------------------------------------------------


def default_harness(model_id: str, quant: str | None) -> str:
    """The harness for a spec that names none: GGUF (a ``quant`` tag, a ``.gguf`` file or a
    ``*-GGUF`` repo) runs on llama.cpp, dense safetensors on transformers."""
    name = model_id.rstrip("/").lower()
    if quant or name.endswith((".gguf", "-gguf")):
        return "llamacpp"
    return "transformers"


class ModelSpec(Wire):
    """How to load one model: what ``/models/load`` takes and ``default_models`` lists."""

    model_id: str = Field(min_length=1)
    harness: str = ""  # empty: chosen from the weights' format (default_harness)
    quant: str | None = None
    tensor_parallel: int | None = Field(default=None, ge=1)
    devices: list[int] | None = None

    @model_validator(mode="after")
    def _pick_harness(self) -> ModelSpec:
        if not self.harness:
            self.harness = default_harness(self.model_id, self.quant)
        return self


class UnloadRequest(Wire):
    model_id: str = Field(min_length=1)


ModelState = Literal["loading", "loaded", "poisoned"]


class ModelStatus(Wire):
    id: str
    harness: str
    status: ModelState
    devices: list[int]
    vram_used_mb: int
    context_length: int | None


class ModelSize(Wire):
    """What ``/models/size`` answers: the memory a load of a spec would take, from its files.

    llamacpp: the GGUF file(s) as stored plus the KV cache it allocates at load.
    transformers: the dense weights in the load dtype, plus 20 % for KV and activations.
    """

    bytes: int  # weights_bytes + kv_bytes: what placement needs free
    weights_bytes: int
    kv_bytes: int


# --- discovery and health ---------------------------------------------------------------------


class DeviceInfo(Wire):
    index: int
    name: str
    vram_total_mb: int
    compute_capability: str | None = None


class CpuInfo(Wire):
    cores: int
    memory_total_mb: int


class Discovery(Wire):
    hostname: str
    os: str
    kernel: str
    cuda_version: str | None
    driver_version: str | None
    devices: list[DeviceInfo]
    cpu: CpuInfo
    harnesses: list[str]


class DeviceHealth(Wire):
    index: int
    vram_used_mb: int
    vram_free_mb: int
    utilization_pct: int | None = None
    temp_c: int | None = None


class CpuHealth(Wire):
    memory_used_mb: int
    memory_free_mb: int


class ActivationFailure(Wire):
    model_id: str
    error: str


class Activation(Wire):
    state: Literal["pre_warming", "ready"]
    pending: list[str]
    in_progress: str | None
    completed: list[str]
    failed: list[ActivationFailure]


class PrefixCacheInfo(Wire):
    """A model's KV cache as a prefix cache: its bounded capacity and how prompts used it."""

    capacity_tokens: int  # KV cells for every sequence together, fixed at load
    # tokens held for sequences, running or retained (a shared prefix counts per sequence)
    cached_tokens: int
    hits: int  # prompts that started with tokens already in the cache
    misses: int
    prompt_tokens_reused: int  # prompt tokens not evaluated thanks to the cache
    prompt_tokens_evaluated: int
    running_tokens: int = 0  # of cached_tokens, those of sequences still generating
    free_tokens: int | None = None  # positions no sequence holds (None: not known)


class BatchInfo(Wire):
    """How a model's decode steps were shared: every running sequence advances in one step."""

    steps: int
    tokens: int  # tokens evaluated, prompts and generated together
    peak_sequences: int  # most sequences in one step since load
    preempted: int = 0  # sequences sent back to wait (and recomputed) for lack of KV room
    kv_wait_timeouts: int = 0  # requests turned away (503) after waiting for KV room


class ModelLoadInfo(Wire):
    in_flight: int
    queued: int
    prefix_cache: PrefixCacheInfo | None = None
    batch: BatchInfo | None = None


class Health(Wire):
    uptime_secs: float
    devices: list[DeviceHealth]
    cpu: CpuHealth
    activation: Activation
    models: dict[str, ModelLoadInfo]


# --- inference requests -----------------------------------------------------------------------


class ChatMessage(Wire):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class StreamOptions(Wire):
    include_usage: bool = False


class SamplingFields(Wire):
    """Sampling knobs shared by chat and legacy completions (OpenAI names plus common extras)."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=100)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]


class ResponseFormat(Wire):
    """OpenAI ``response_format``: ``text``, ``json_object`` or ``json_schema``.

    ``type`` stays a plain string: an unknown one is refused where it is honoured, as a 400
    naming ``response_format`` (never silently ignored)."""

    type: str
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict", "description"}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return self.prompt[0]

    def token_limit(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(Wire):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class Usage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
