"""helexa-acp config: file, environment, XDG paths (no agent process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helexa.acp.config import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    AcpConfig,
    EnvOverrides,
    apply_overrides,
    config_path,
    load_config,
)
from helexa.core.settings import ConfigError


def test_no_file_no_env_is_a_local_cortex(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    config = load_config(env)
    endpoint = config.endpoint()
    assert (endpoint.base_url, endpoint.model, endpoint.wire_api) == (
        DEFAULT_BASE_URL,
        DEFAULT_MODEL,
        "openai-chat",
    )
    assert config.max_rounds == 50


def test_xdg_paths_and_the_config_variable(tmp_path: Path) -> None:
    env = {
        "XDG_CONFIG_HOME": str(tmp_path / "c"),
        "XDG_DATA_HOME": str(tmp_path / "d"),
        "XDG_STATE_HOME": str(tmp_path / "s"),
    }
    assert config_path(env) == tmp_path / "c" / "helexa-acp" / "config.toml"
    config = load_config(env)
    assert config.sessions_dir == tmp_path / "d" / "helexa-acp" / "sessions"
    assert config.log_file == tmp_path / "s" / "helexa-acp" / "helexa-acp.log"
    named = tmp_path / "other.toml"
    named.write_text('max_rounds = 7\nlog_file = "~/x.log"\n')
    config = load_config({**env, "HELEXA_ACP_CONFIG": str(named)})
    assert config.max_rounds == 7
    assert config.log_file == Path.home() / "x.log"
    with pytest.raises(ConfigError, match="no such file"):
        load_config({**env, "HELEXA_ACP_CONFIG": str(tmp_path / "missing.toml")})


def test_environment_overrides_the_default_endpoint_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'default_endpoint = "b"\n'
        '[[endpoints]]\nname = "a"\nbase_url = "http://a:1/v1"\n'
        '[[endpoints]]\nname = "b"\nbase_url = "http://b:2/v1/"\nwire_api = "anthropic-messages"\n'
        'api_key_env = "B_KEY"\ncontext_window = 4096\n'
    )
    env = {
        "HELEXA_ACP_CONFIG": str(path),
        "HELEXA_ACP_MODEL": "m/x",
        "HELEXA_ACP_MAX_TOKENS": "99",
        "B_KEY": "sk-b",
    }
    config = load_config(env)
    b = config.endpoint()
    assert (b.name, b.base_url, b.model, b.max_tokens, b.context_window) == (
        "b",
        "http://b:2/v1",
        "m/x",
        99,
        4096,
    )
    assert b.resolved_api_key(env) == "sk-b"
    assert config.endpoint("a").model == DEFAULT_MODEL  # untouched
    keyed = load_config({**env, "HELEXA_ACP_API_KEY": "sk-literal"})
    assert keyed.endpoint().resolved_api_key(env) == "sk-literal"


def test_bad_files_are_errors_that_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[[endpoints]]\nname = "a"\nwire_api = "grpc"\n')
    with pytest.raises(ConfigError, match="wire_api"):
        load_config({"HELEXA_ACP_CONFIG": str(path)})
    path.write_text("bogus_key = 1\n")
    with pytest.raises(ConfigError, match="bogus_key"):
        load_config({"HELEXA_ACP_CONFIG": str(path)})
    path.write_text('default_endpoint = "nope"\n')
    with pytest.raises(ConfigError, match="nope"):
        load_config({"HELEXA_ACP_CONFIG": str(path)})


def test_apply_overrides_is_pure() -> None:
    data: dict[str, object] = {"endpoints": [{"name": "x"}]}
    out = apply_overrides(data, EnvOverrides.model_validate({"base_url": "http://h:1/v1"}))
    assert data == {"endpoints": [{"name": "x"}]}
    assert AcpConfig.model_validate(out).endpoint().base_url == "http://h:1/v1"
