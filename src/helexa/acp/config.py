"""helexa-acp configuration: ``config.toml`` (one or more endpoints) under the environment.

Precedence, highest first: ``HELEXA_ACP_*`` variables (they shape the default endpoint),
the TOML file, defaults. With no file at all the agent talks to a local cortex.

    default_endpoint = "cortex"
    max_rounds = 50
    [[endpoints]]
    name = "cortex"
    base_url = "http://127.0.0.1:31313/v1"
    wire_api = "openai-chat"          # or "anthropic-messages"
    model = "helexa/default"
    api_key_env = "HELEXA_API_KEY"    # the variable holding the key, never the key itself
    max_tokens = 8192
    context_window = 32768
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from helexa.core.settings import ConfigError, describe_validation_error, read_toml, require_unique

DEFAULT_BASE_URL = "http://127.0.0.1:31313/v1"
DEFAULT_MODEL = "helexa/default"
APP = "helexa-acp"

WireApi = Literal["openai-chat", "anthropic-messages"]
ModeId = Literal["default", "bypass", "plan"]


class EndpointConfig(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(default="cortex", min_length=1)
    base_url: str = DEFAULT_BASE_URL
    wire_api: WireApi = "openai-chat"
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    api_key_env: str | None = None
    # Set only from HELEXA_ACP_API_KEY: a file should name a variable, not hold a secret.
    api_key: str | None = Field(default=None, exclude=True)
    max_tokens: int = Field(default=8192, ge=1)
    context_window: int = Field(default=32768, ge=256)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Between bytes of a stream, not in total: cortex may cold-load a model first.
    read_timeout_s: float = Field(default=900.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value.rstrip("/")

    def resolved_api_key(self, env: Mapping[str, str] | None = None) -> str | None:
        env = os.environ if env is None else env
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return env.get(self.api_key_env) or None
        return None


class AcpConfig(BaseModel):
    """The TOML document, after the environment is applied."""

    model_config = {"extra": "forbid"}

    default_endpoint: str | None = None
    endpoints: list[EndpointConfig] = Field(default_factory=lambda: [EndpointConfig()])
    default_mode: ModeId = "default"
    max_rounds: int = Field(default=50, ge=1)
    bash_timeout_s: float = Field(default=120.0, gt=0)
    bash_output_limit: int = Field(default=64 * 1024, ge=1024)  # bytes kept of a command
    tool_output_limit: int = Field(default=64 * 1024, ge=1024)  # chars a tool returns
    models_timeout_s: float = Field(default=3.0, gt=0)  # GET /models for the picker
    log_file: Path | None = None
    log_level: str = "info"
    sessions_dir: Path | None = None

    @field_validator("log_file", "sessions_dir")
    @classmethod
    def _home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _endpoints(self) -> AcpConfig:
        if not self.endpoints:
            raise ValueError("at least one [[endpoints]] entry is needed")
        require_unique([e.name for e in self.endpoints], "endpoint")
        names = [e.name for e in self.endpoints]
        if self.default_endpoint is not None and self.default_endpoint not in names:
            raise ValueError(f"default_endpoint {self.default_endpoint!r} is not one of {names}")
        return self

    def endpoint(self, name: str | None = None) -> EndpointConfig:
        """The named endpoint; unknown or None: the default one."""
        wanted = name or self.default_endpoint
        for entry in self.endpoints:
            if entry.name == wanted:
                return entry
        return self.endpoints[0]


class EnvOverrides(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HELEXA_ACP_", env_ignore_empty=True)

    config: Path | None = None
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    wire_api: WireApi | None = None
    max_tokens: int | None = None
    context_window: int | None = None
    max_rounds: int | None = None
    log_file: Path | None = None
    log_level: str | None = None
    sessions_dir: Path | None = None


def _xdg(env: Mapping[str, str], var: str, fallback: str) -> Path:
    # The XDG spec says a relative value is invalid and must be ignored.
    value = env.get(var, "")
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("HELEXA_ACP_CONFIG"):
        return Path(env["HELEXA_ACP_CONFIG"]).expanduser()
    return _xdg(env, "XDG_CONFIG_HOME", ".config") / APP / "config.toml"


def default_sessions_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return _xdg(env, "XDG_DATA_HOME", ".local/share") / APP / "sessions"


def default_log_file(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return _xdg(env, "XDG_STATE_HOME", ".local/state") / APP / f"{APP}.log"


def apply_overrides(data: dict[str, object], env: EnvOverrides) -> dict[str, object]:
    """The TOML document with the environment laid over it (pure: returns a new dict)."""
    out = dict(data)
    for key in ("max_rounds", "log_file", "log_level", "sessions_dir"):
        if getattr(env, key) is not None:
            out[key] = getattr(env, key)
    endpoint_keys = ("base_url", "model", "api_key", "wire_api", "max_tokens", "context_window")
    patch = {k: getattr(env, k) for k in endpoint_keys if getattr(env, k) is not None}
    if not patch:
        return out
    raw = out.get("endpoints")
    endpoints = [dict(e) for e in raw] if isinstance(raw, list) and raw else [{}]
    wanted = out.get("default_endpoint")
    index = next((i for i, e in enumerate(endpoints) if e.get("name") == wanted), 0)
    endpoints[index] = {**endpoints[index], **patch}
    out["endpoints"] = endpoints
    return out


def load_config(env: Mapping[str, str] | None = None) -> AcpConfig:
    """Read the config file (missing: defaults) and apply ``HELEXA_ACP_*``; ConfigError
    names what is wrong. A file named by HELEXA_ACP_CONFIG must exist."""
    env_map = os.environ if env is None else env
    path = config_path(env_map)
    if env_map.get("HELEXA_ACP_CONFIG") and not path.exists():
        raise ConfigError(f"{path}: no such file (named by HELEXA_ACP_CONFIG)")
    data = read_toml(path) if path.exists() else {}
    try:
        overrides = EnvOverrides(_env_file=None) if env is None else _overrides_from(env)
        config = AcpConfig.model_validate(apply_overrides(data, overrides))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(path))) from exc
    updates: dict[str, object] = {}
    if config.sessions_dir is None:
        updates["sessions_dir"] = default_sessions_dir(env_map)
    if config.log_file is None:
        updates["log_file"] = default_log_file(env_map)
    return config.model_copy(update=updates)


def _overrides_from(env: Mapping[str, str]) -> EnvOverrides:
    """EnvOverrides from an explicit mapping (tests), with the same names and rules."""
    prefix = "HELEXA_ACP_"
    values = {
        key[len(prefix) :].lower(): value
        for key, value in env.items()
        if key.startswith(prefix) and value != ""
    }
    known = {k: v for k, v in values.items() if k in EnvOverrides.model_fields}
    return EnvOverrides.model_validate(known)
