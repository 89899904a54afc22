"""Wire types shared by cortex and neuron: defined once, validated by pydantic."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

# "stream": a JSON boolean, or null (false), as OpenAI takes it; "true" or 1 would stream
# where the caller reads JSON, so they are refused rather than coerced.
StreamFlag = Annotated[StrictBool, BeforeValidator(lambda value: False if value is None else value)]


class Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- request limits (§2.8.1): generous, but bounded ---------------------------------------------

MAX_MESSAGES = 10_000
MAX_TOOLS = 512
MAX_STOP = 16
MAX_MODEL_ID = 255
# Template variables a client may set: the reasoning switches of the chat templates served
# (Qwen3/GLM/Hunyuan ``enable_thinking``, DeepSeek ``thinking``, gpt-oss ``reasoning_effort``,
# Granite ``thinking``/``reasoning``). Never ``chat_template``, ``tokenize``, ``tools`` … —
# keys the renderer sets itself or that would replace the model's template.
TEMPLATE_KWARGS = frozenset(
    {"enable_thinking", "thinking", "reasoning_effort", "reasoning", "thinking_budget"}
)
_MAX_TEMPLATE_VALUE = 256  # characters of a string value
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f*?\[\]]")
_QUANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def _describe(char: str) -> str:
    if char == "\x00":
        return "a NUL byte"
    if char in "*?[]":
        return f"the glob character {char!r}"
    return f"the control character U+{ord(char):04X}"


def check_model_name(value: str, *, paths: bool = False, client: bool = False) -> str:
    """A model id as clients and configs name it: 1 to 255 characters, no NUL or other control
    characters, no glob characters (``* ? [ ]``), and — unless ``paths`` (a spec may name a
    folder under model_dirs, whose escapes are refused with 403 where it is resolved) — no
    ``..`` segment. ``client``: a name a client sent cortex, which only routes it (a
    catalogue or fallback lookup, never a glob or a path on a gateway): glob characters
    pass there, as in Claude Code's ``claude-…[1m]``. Raises ValueError saying which rule
    it breaks."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_MODEL_ID:
        raise ValueError(f"must be at most {MAX_MODEL_ID} characters, not {len(value)}")
    bad = (_CONTROL if client else _UNSAFE_NAME).search(value)
    if bad:
        raise ValueError(f"must not contain {_describe(bad.group())}")
    if client:
        return value
    if not paths and ".." in value.replace("\\", "/").split("/"):
        raise ValueError("must not contain a '..' path segment")
    return value


def check_quant(value: str | None) -> str | None:
    """A GGUF quant tag (Q4_K_M, IQ2_XXS, F16, UD-Q4_K_XL …): it becomes a file pattern, so
    nothing that could match every file of a repo."""
    if value is None:
        return None
    if not _QUANT.match(value) or not any(c.isdigit() for c in value):
        raise ValueError(
            f"{value[:80]!r} is not a quant tag (letters, digits, '_', '-', '.', '+', with a "
            "digit, at most 64 characters; e.g. Q4_K_M)"
        )
    return value


def _model_path(value: str) -> str:
    return check_model_name(value, paths=True)


def check_template_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """``chat_template_kwargs``: only the allowlisted switches, each a JSON scalar."""
    if value is None:
        return None
    for key, item in value.items():
        if key not in TEMPLATE_KWARGS:
            raise ValueError(
                f"key {key[:80]!r} is not allowed (allowed: {', '.join(sorted(TEMPLATE_KWARGS))})"
            )
        if item is not None and not isinstance(item, (bool, int, float, str)):
            raise ValueError(f"{key!r} must be a JSON scalar (string, number, boolean or null)")
        if isinstance(item, str) and len(item) > _MAX_TEMPLATE_VALUE:
            raise ValueError(f"{key!r} must be at most {_MAX_TEMPLATE_VALUE} characters")
    return value


ModelName = Annotated[str, AfterValidator(check_model_name)]
# A name a client sent cortex: routed by lookup only (see check_model_name).
ClientModelName = Annotated[str, AfterValidator(lambda v: check_model_name(v, client=True))]
ModelPath = Annotated[str, AfterValidator(_model_path)]  # may name a folder under model_dirs
TemplateKwargs = Annotated[dict[str, Any] | None, AfterValidator(check_template_kwargs)]


# --- model lifecycle --------------------------------------------------------------------------


def default_harness(model_id: str, quant: str | None) -> str:
    """The harness for a spec that names none: GGUF (a ``quant`` tag, a ``.gguf`` file or a
    ``*-GGUF`` repo) runs on llama.cpp, dense safetensors on transformers."""
    name = model_id.rstrip("/").lower()
    if quant or name.endswith((".gguf", "-gguf")):
        return "llamacpp"
    return "transformers"


MAX_REMOTE_DEVICES = 16


class RemoteDevice(Wire):
    """A device another host lends to a model (a donor's ggml RPC server, docs/pooling.md)."""

    endpoint: Annotated[str, Field(min_length=3, max_length=300, pattern=r"^[^\s/]+:\d{1,5}$")]
    mb: int = Field(ge=1)  # the memory it gives the model: its share of the layers

    @field_validator("endpoint")
    @classmethod
    def _port(cls, value: str) -> str:
        if not 0 < int(value.rpartition(":")[2]) <= 65535:
            raise ValueError("the port must be 1-65535")
        return value


class ModelSpec(Wire):
    """How to load one model: what ``/models/load`` takes and ``default_models`` lists."""

    model_id: ModelPath
    harness: str = ""  # empty: chosen from the weights' format (default_harness)
    quant: Annotated[str | None, AfterValidator(check_quant)] = None
    tensor_parallel: int | None = Field(default=None, ge=1)
    devices: list[int] | None = None
    # A pooled load (GGUF only): the model's layers split over this host's device and these
    # remote ones, in proportion to the memory each gives (``local_mb`` here; None: the
    # rest of the model's size).
    rpc: list[RemoteDevice] | None = Field(default=None, max_length=MAX_REMOTE_DEVICES)
    local_mb: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _pick_harness(self) -> ModelSpec:
        if not self.harness:
            self.harness = default_harness(self.model_id, self.quant)
        if self.local_mb is not None and not self.rpc:
            raise ValueError("local_mb is a pooled load's share: it needs rpc")
        return self


class UnloadRequest(Wire):
    model_id: ModelPath


class RecycleRequest(Wire):
    """``POST /workers/recycle``: one device's worker ("cpu", "cuda:N"), or every idle one."""

    device: str | None = None


class RecycleResult(Wire):
    recycled: list[str]  # the devices whose worker was replaced (their models reloaded)


ModelState = Literal["loading", "loaded", "poisoned", "failed"]


class ModelStatus(Wire):
    id: str
    harness: str
    status: ModelState
    devices: list[int]
    vram_used_mb: int
    context_length: int | None
    error: str | None = None  # why it is ``failed`` (its worker crashed, and how)
    rpc: list[RemoteDevice] | None = None  # a pooled model's remote devices
    local_mb: int | None = None  # and what this host gives it


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
    vram_free_mb: int  # less what is lent
    lent_mb: int = 0
    utilization_pct: int | None = None
    temp_c: int | None = None


class CpuHealth(Wire):
    memory_used_mb: int
    memory_free_mb: int  # what a load may still take: the budget less used and lent
    lent_mb: int = 0  # given to other hosts' models (loans)


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
    # idle conversations' caches kept in host memory while others run (llamacpp), not counted
    # in cached_tokens; brought back when their conversation goes on
    parked_tokens: int = 0
    parked_bytes: int = 0


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
    status: ModelState | None = None
    error: str | None = None  # why it is ``failed``
    prefix_cache: PrefixCacheInfo | None = None
    batch: BatchInfo | None = None


class WorkerHealth(Wire):
    """One device's worker process."""

    device: str  # "cpu", "cuda:N", or "pool:<model id>" (a pooled model's own worker)
    pid: int | None
    state: Literal["starting", "ready", "restarting", "down"]
    restarts: int  # since the neuron started (crashes and recycles)
    startup_s: float | None = None  # the running worker's start: imports and engine set-up
    last_exit: str | None = None  # how the previous one ended, when it crashed
    in_flight: int = 0
    output_frames: int = 0  # generation output frames from this worker (one per step or fewer)


class LendRequest(Wire):
    """``POST /rpc/lend``: run an RPC server for one device, for one borrower's model."""

    device: int | None = None  # the CUDA index; None: the CPU
    mb: int = Field(ge=1)  # memory reserved for the loan (and the borrower's share)
    borrower: Annotated[str, Field(min_length=1, max_length=255)]  # host name or IP
    model_id: ModelPath
    # More addresses the borrower may connect from (a host with several); never a wildcard.
    allow: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list, max_length=8)


class ReleaseRequest(Wire):
    loan_id: Annotated[str, Field(min_length=1, max_length=64)]


class Loan(Wire):
    """A device lent to another host's model, as ``/health`` shows it."""

    id: str
    device: str  # "cpu" or "cuda:N"
    mb: int
    model_id: str
    borrower: str
    allowed: list[str]  # the addresses admitted (the borrower's)
    endpoint: str  # host:port the borrower connects to
    state: Literal["waiting", "connected", "idle"]  # idle: the borrower left; ends soon
    pid: int | None = None
    connections: int = 0
    refused: int = 0  # connections from addresses not allowed (reset before the handshake)
    bytes_to_donor: int = 0  # relayed so far (updated every second)
    bytes_to_borrower: int = 0
    messages: int = 0  # reads relayed to the borrower: about one per RPC reply
    age_s: float = 0.0


class DownloadInfo(Wire):
    """A download of weights, as ``/health`` shows it."""

    model_id: str
    quant: str | None = None
    state: Literal["downloading", "done", "failed"]
    done_bytes: int = 0
    total_bytes: int | None = None  # None until the hub said
    rate_bytes_s: int | None = None
    eta_s: float | None = None
    error: str | None = None


class StoredModel(Wire):
    """Weights a neuron holds (``GET /models/stored``)."""

    model_id: str
    where: Literal["cache", "model_dirs"]
    bytes: int
    files: list[str] = []


class Health(Wire):
    uptime_secs: float
    devices: list[DeviceHealth]
    cpu: CpuHealth
    activation: Activation
    models: dict[str, ModelLoadInfo]
    workers: list[WorkerHealth] = []
    loans: list[Loan] = []  # devices lent to other hosts' models
    downloads: list[DownloadInfo] = []  # weights being (or lately) downloaded
    draining: bool = False  # shutting down: finishing what it has, admitting nothing new
    status: Literal["ok", "draining"] = "ok"  # the same, for people and load balancers


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

    model: ModelName
    stream: StreamFlag = False
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
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, not {len(value)}")
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
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: TemplateKwargs = None
    response_format: ResponseFormat | None = None
    # helexa extension: a max_tokens above the context is clamped to it instead of a 400.
    # cortex sets it for Anthropic clients, which size max_tokens for Claude (Claude Code
    # asks for 32k-64k), not for the model that serves them.
    fit_max_tokens: bool = False

    @field_validator("tool_choice")
    @classmethod
    def _choice_of_the_tools_given(cls, choice: Any, info: ValidationInfo) -> Any:
        """A choice that cannot be met is the client's mistake, as on OpenAI: never ignored."""
        if choice is None:
            return None
        tools = info.data.get("tools") or []
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise ValueError("must be 'none', 'auto', 'required' or a named function")
            if choice == "required" and not tools:
                raise ValueError("'required' needs tools")
            return choice
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ValueError('must be {"type": "function", "function": {"name": ...}}')
        names = {
            t.get("function", {}).get("name") for t in tools if isinstance(t.get("function"), dict)
        }
        if name not in names:
            raise ValueError(f"names the function {name!r}, which is not among the tools")
        return choice

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
    model: ModelName
    messages: list[ChatMessage] | None = Field(default=None, max_length=MAX_MESSAGES)
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    chat_template_kwargs: TemplateKwargs = None


class Usage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
