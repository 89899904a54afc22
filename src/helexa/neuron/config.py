"""neuron.toml: what one host serves and how (env prefix ``NEURON_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from helexa.core.auth import clean_secret, is_loopback
from helexa.core.browser import HttpSettings
from helexa.core.serving import LimitsSettings
from helexa.core.wire import ModelSpec

DEFAULT_PORT = 13131
DEFAULT_CONFIG_PATH = Path("/etc/neuron/neuron.toml")


class HarnessEntry(BaseModel):
    name: str


class TransformersHarnessSettings(BaseModel):
    hf_cache: Path | None = None
    # dtypes per device kind; "auto" picks bf16 (fp16 without bf16 support) on CUDA, fp32 on CPU.
    cuda_dtype: str = "auto"
    cpu_dtype: str = "float32"
    # The KV cache of each model, fixed at load: kv_cache_mb, else kv_cache_fraction of the
    # weights (0.2: the headroom cortex plans for), within the room the device has left.
    kv_cache_mb: int | None = Field(default=None, ge=1)
    kv_cache_fraction: float = Field(default=0.2, gt=0, le=8)
    # Without kv_cache_mb the cache holds at least one request of the trained context,
    # capped at this (the llamacpp harness's cap of the same name).
    max_default_context_tokens: int = Field(default=40960, ge=256)
    kv_block_tokens: int = Field(default=16, ge=1, le=1024)
    max_sequences: int = Field(default=8, ge=1, le=256)  # decoded together or kept cached
    batch_tokens: int = Field(default=512, ge=16)  # tokens per step (chunked prefill)
    batching: bool = True  # False: each request decodes in its own forward pass


class LlamaCppHarnessSettings(BaseModel):
    hf_cache: Path | None = None  # None: the transformers harness's setting, then HF defaults
    # KV cache cells shared by every sequence of a model (its prefix cache too), fixed at load;
    # also the longest context one request gets. None: the model's trained context, capped.
    context_tokens: int | None = Field(default=None, ge=256)
    max_default_context_tokens: int = Field(default=40960, ge=256)
    slots: int = Field(default=8, ge=1, le=64)  # sequences decoded together or kept cached
    # Host memory for idle conversations' KV while others run (their cells would slow every
    # decode: one unified cache); brought back when the conversation goes on. 0: off.
    host_cache_mb: int = Field(default=2048, ge=0)
    batch_tokens: int = Field(default=512, ge=32)  # tokens per decode step (chunked prefill)
    n_gpu_layers: int = -1  # layers offloaded to the GPU(s) of a GPU placement; -1: all
    flash_attn: bool | None = None  # None: llama.cpp decides
    threads: int | None = Field(default=None, ge=1)  # None: cpu.threads, then llama.cpp's


class HarnessSettings(BaseModel):
    transformers: TransformersHarnessSettings = Field(default_factory=TransformersHarnessSettings)
    llamacpp: LlamaCppHarnessSettings = Field(default_factory=LlamaCppHarnessSettings)


class CpuSettings(BaseModel):
    memory_mb: int | None = Field(default=None, ge=1)  # None: 80 % of RAM
    threads: int | None = Field(default=None, ge=1)


class WorkerSettings(BaseModel):
    """The worker process of each device (docs/neuron.md, "Process layout")."""

    # false: the engines run in the neuron's own process, as threads (no crash isolation,
    # one interpreter lock for every device): for debugging and comparison only.
    isolate: bool = True
    start_timeout_s: float = Field(default=120.0, gt=0)  # imports and engine set-up
    # Crashes of a model's worker (while it was loaded or loading) after which it is not
    # reloaded again; restarts wait restart_backoff_s, doubling, up to 30 s.
    max_restarts: int = Field(default=3, ge=0)
    restart_backoff_s: float = Field(default=0.5, ge=0)
    # A worker whose loop does not answer a ping for this long (stopped, deadlocked in native
    # code) is killed and restarted like a crashed one.
    heartbeat_timeout_s: float = Field(default=30.0, gt=0)
    heartbeat_s: float = Field(default=1.0, gt=0)


class RpcSettings(BaseModel):
    """Lending this host's devices to other hosts' models over ggml's RPC (docs/pooling.md).

    ggml RPC has no authentication: a donor's server listens on loopback, behind a gate on
    ``host`` that admits only the borrower cortex named (an allowlist of its addresses)."""

    lend: bool = True  # false: this neuron never lends a device (it may still borrow)
    # The fleet address the gates listen on. None: the neuron's own ``host`` when that is a
    # single address (never a wildcard: a neuron on 0.0.0.0 lends only with this set).
    host: str | None = None
    ports: tuple[int, int] = (50052, 50099)  # one port per loan, from this range (firewalld)
    # A loan ends when its borrower has been disconnected this long (it unloaded, crashed or
    # went away), or never connected within connect_timeout_s.
    idle_grace_s: float = Field(default=10.0, gt=0)
    connect_timeout_s: float = Field(default=120.0, gt=0)
    cache_dir: Path | None = None  # ggml's tensor cache: a re-lent model's weights skip the wire
    # Borrowing: a pooled model generating nothing this long has a donor that stopped
    # answering (its host up, its connection open): its worker is ended, as when one dies.
    stall_timeout_s: float = Field(default=120.0, gt=0)

    @field_validator("ports")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        lo, hi = value
        if not 0 < lo <= hi <= 65535:
            raise ValueError(f"ports must be [low, high] within 1-65535, got {list(value)}")
        return value


class AdmissionSettings(BaseModel):
    max_concurrent: int = Field(default=4, ge=1)  # generations interleaved per model
    max_queue: int = Field(default=32, ge=0)  # waiting beyond those
    queue_timeout_s: float = Field(default=30.0, gt=0)
    retry_after_s: int = Field(default=2, ge=1)


class NeuronSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NEURON_", env_nested_delimiter="__", extra="forbid"
    )

    # Loopback unless told otherwise: listening beyond it needs the shared token.
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    harnesses: list[HarnessEntry] = Field(
        default_factory=lambda: [HarnessEntry(name="transformers"), HarnessEntry(name="llamacpp")]
    )
    harness: HarnessSettings = Field(default_factory=HarnessSettings)
    default_models: list[ModelSpec] = Field(default_factory=list)
    model_dirs: list[Path] = Field(default_factory=list)
    cpu: CpuSettings = Field(default_factory=CpuSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)
    rpc: RpcSettings = Field(default_factory=RpcSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    # Required (Authorization: Bearer) by every route but /health; a neuron listening beyond
    # loopback without one refuses to start. cortex.toml's neuron_token must match.
    token: str | None = None
    admin_token: str | None = None  # the old name of ``token`` (it guarded admin routes only)
    keepalive_s: float = Field(default=5.0, gt=0)  # SSE comment cadence while prefilling
    drain_timeout_s: float = Field(default=90.0, ge=0)  # in-flight grace on SIGTERM (< 120 s)
    log_level: str = "info"

    @field_validator("token", "admin_token")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return clean_secret(value)

    @model_validator(mode="after")
    def _renamed_token(self) -> NeuronSettings:
        if self.token is None and self.admin_token:
            self.token = self.admin_token
        if not self.token:  # an empty token guards nothing
            self.token = None
        return self

    @field_validator("harnesses")
    @classmethod
    def _unique_harnesses(cls, value: list[HarnessEntry]) -> list[HarnessEntry]:
        names = [h.name for h in value]
        if len(set(names)) != len(names):
            raise ValueError(f"harness listed twice: {names}")
        return value


def unguarded_listen(settings: NeuronSettings) -> str | None:
    """Why the neuron must not start as configured (listening beyond loopback with no
    token: anyone on the network could load models and run them), or None."""
    if settings.token or is_loopback(settings.host):
        return None
    return (
        f"host {settings.host!r} listens beyond loopback, so a shared token is required: "
        'set token = "<random secret>" in neuron.toml (or NEURON_TOKEN) and the same value '
        "as neuron_token in cortex.toml — or listen on loopback only (--host 127.0.0.1). "
        "A token: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    )
