"""cortex.toml (env prefix ``CORTEX_``) plus the models.toml catalogue it points to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from helexa.core.auth import clean_secret
from helexa.core.browser import HttpSettings
from helexa.core.serving import LimitsSettings
from helexa.core.settings import ConfigError, load_settings, require_unique
from helexa.cortex.catalogue import Catalogue, load_catalogue
from helexa.cortex.keys import keys_path, read_keys
from helexa.cortex.translate.tool_set import HostedTools

DEFAULT_CONFIG_PATH = Path("/etc/cortex/cortex.toml")


def split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class GatewaySettings(BaseModel):
    listen: str = "0.0.0.0:31313"
    metrics_listen: str = "0.0.0.0:31314"
    # On SIGTERM: how long requests in flight may go on; what is left then ends with an
    # error event (streams) or a 503 shutting_down. Keep it under the unit's stop timeout.
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # cortex_requests_by_key_total{key}: API key names on the metrics port, which has no auth.
    metrics_key_names: bool = False

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_listen(value)
        return value


class EvictionSettings(BaseModel):
    strategy: Literal["lru", "priority"] = "lru"
    defrag_after_cycles: int = Field(default=50, ge=0)


class NeuronEntry(BaseModel):
    name: str = Field(min_length=1)
    endpoint: str
    token: str | None = None  # this neuron's token, when not the global neuron_token

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected http://host:port, got {value!r}")
        return value.rstrip("/")

    @field_validator("token")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return clean_secret(value)


class PollerSettings(BaseModel):
    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=3.0, gt=0)
    unhealthy_after: int = Field(default=2, ge=1)  # consecutive failures


class ProxySettings(BaseModel):
    connect_timeout_s: float = Field(default=3.0, gt=0)
    idle_timeout_s: float = Field(default=120.0, gt=0)  # between bytes, not in total
    # A non-streaming answer shows no sign of life until it is done: wait this long.
    generation_timeout_s: float = Field(default=1800.0, gt=0)
    load_timeout_s: float = Field(default=1800.0, gt=0)
    retry_after_s: int = Field(default=5, ge=1)


class AuthSettings(BaseModel):
    # API keys, hashed (``cortex keys add|list|revoke``); relative: next to cortex.toml.
    # Set, every /v1 route needs a key (none in the file: every request is refused).
    keys_file: Path | None = None
    # One literal key besides the file's (containers: CORTEX_AUTH__API_KEY); logged as ":env".
    api_key: str | None = None

    @field_validator("api_key")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return clean_secret(value)


class CompatSettings(BaseModel):
    # Tools no model here can call (OpenAI's web_search/file_search/…, Anthropic's server
    # tools): "omit" leaves them out of what the model sees and names them in the
    # x-helexa-omitted-tools header and the access log; "reject" answers 400 instead.
    hosted_tools: HostedTools = "omit"


class CortexSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CORTEX_", env_nested_delimiter="__", extra="forbid"
    )

    models_config: Path = Path("models.toml")
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    eviction: EvictionSettings = Field(default_factory=EvictionSettings)
    poller: PollerSettings = Field(default_factory=PollerSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    compat: CompatSettings = Field(default_factory=CompatSettings)
    neurons: list[NeuronEntry] = Field(default_factory=list)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    admin_token: str | None = None  # required by /admin/* (Bearer)
    # Sent to every neuron on every request (a [[neurons]] entry's token overrides it);
    # unset: admin_token, as configs before the split had it.
    neuron_token: str | None = None
    log_level: str = "info"

    @field_validator("admin_token", "neuron_token")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return clean_secret(value)

    @field_validator("neurons")
    @classmethod
    def _unique(cls, value: list[NeuronEntry]) -> list[NeuronEntry]:
        require_unique([n.name for n in value], "neuron")
        return value


@dataclass(frozen=True)
class CortexConfig:
    settings: CortexSettings
    catalogue: Catalogue
    path: Path | None


def load_config(path: Path | None) -> CortexConfig:
    """cortex.toml and its catalogue, cross-checked; ConfigError names what is wrong."""
    settings = load_settings(CortexSettings, path)
    models_path = settings.models_config
    if not models_path.is_absolute():
        models_path = (path.parent if path else Path.cwd()) / models_path
    catalogue = load_catalogue(models_path)
    keys = keys_path(settings.auth.keys_file, path)
    if keys is not None:
        read_keys(keys)  # a keys file that does not parse is a config error, named
    known = {n.name for n in settings.neurons}
    problems = [
        f"{models_path}: model {p.id!r} is pinned_on unknown neuron(s) "
        f"{sorted(set(p.pinned_on) - known)}"
        for p in catalogue.models.values()
        if set(p.pinned_on) - known
    ]
    if problems:
        raise ConfigError("\n".join(problems))
    return CortexConfig(settings=settings, catalogue=catalogue, path=path)
