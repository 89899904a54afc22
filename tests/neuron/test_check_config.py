"""``neuron check-config [PATH]``: which file, which harnesses, and whether each default
model's weights are on this host — found offline, as a load finds them, never downloaded.
And ``neuron --version``; ``neuron --config X`` still serves (every daemon test starts it so)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helexa.up.tiny_model import GGUF_Q8_0_FILENAME, TINY_REPO_ID
from tests.conftest import GGUF_REPO_ID, LOCAL_MODEL
from tests.support.procs import console_script


def neuron(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NEURON_"))}
    return subprocess.run(  # no HF_HUB_OFFLINE: the check must not go to the hub on its own
        [console_script("neuron"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def test_check_config_finds_weights_offline(
    tmp_path: Path, hf_cache: Path, model_dir: Path
) -> None:
    before = sorted(p.name for p in hf_cache.iterdir())
    # A folder holding only a GGUF (no config.json): llamacpp's, without harness =.
    gguf = next(hf_cache.glob(f"models--helexa--tiny-qwen3-gguf/snapshots/*/{GGUF_Q8_0_FILENAME}"))
    (tmp_path / "models" / "plain-gguf").mkdir(parents=True)
    (tmp_path / "models" / "plain-gguf" / "m.gguf").write_bytes(gguf.read_bytes())
    config = tmp_path / "neuron.toml"
    config.write_text(
        f'host = "127.0.0.1"\nmodel_dirs = ["{model_dir}", "{tmp_path / "nowhere"}", '
        f'"{tmp_path / "models"}"]\n'
        f'[harness.transformers]\nhf_cache = "{hf_cache}"\n'
        f'[[default_models]]\nmodel_id = "{TINY_REPO_ID}"\n'
        f'[[default_models]]\nmodel_id = "{LOCAL_MODEL}"\n'
        f'[[default_models]]\nmodel_id = "{GGUF_REPO_ID}"\nquant = "Q8_0"\n'
        '[[default_models]]\nmodel_id = "org/absent"\n'
        '[[default_models]]\nmodel_id = "plain-gguf"\n'
    )
    result = neuron("check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith(f"checking {config}\n")
    assert f"harness transformers: weight cache {hf_cache}" in out
    assert f"harness llamacpp: weight cache {hf_cache}" in out  # falls back to transformers'
    assert f"default model {TINY_REPO_ID} on transformers: {hf_cache}" in out
    assert f"default model {LOCAL_MODEL} on transformers: {model_dir / LOCAL_MODEL}" in out
    assert f"default model {GGUF_REPO_ID} (Q8_0) on llamacpp: {hf_cache}" in out
    assert "Q8_0.gguf" in out
    gguf_path = tmp_path / "models" / "plain-gguf" / "m.gguf"
    assert f"default model plain-gguf on llamacpp: {gguf_path}" in out
    assert f"warning: model_dirs: {tmp_path / 'nowhere'} does not exist" in out
    assert "warning: default model org/absent: not on this host yet" in out
    assert "ok (2 warnings)" in out
    assert sorted(p.name for p in hf_cache.iterdir()) == before  # nothing fetched or created


def test_check_config_failures_say_what_to_do(tmp_path: Path) -> None:
    if Path("/etc/neuron/neuron.toml").exists():
        pytest.skip("this host has a real /etc/neuron/neuron.toml")
    missing = neuron("check-config", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "neuron check-config: /etc/neuron/neuron.toml does not exist; pass the path: "
        "neuron check-config path/to/neuron.toml"
    )
    bad = tmp_path / "neuron.toml"
    bad.write_text('host = "127.0.0.1"\nport = "many"\n')
    invalid = neuron("check-config", str(bad))
    assert invalid.returncode == 1 and "port" in invalid.stderr
    bad.write_text('host = "127.0.0.1"\n[[harnesses]]\nname = "vllm"\n')
    unknown = neuron("check-config", str(bad))
    assert unknown.returncode == 1 and "unknown harness 'vllm'" in unknown.stderr


def test_neuron_version_and_help() -> None:
    from helexa import __version__

    version = neuron("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"neuron {__version__}"
    usage = neuron("--help")
    assert usage.returncode == 0
    assert "--config" in usage.stdout and "neuron check-config" in usage.stdout
    wrong = neuron("--no-such-flag")
    assert wrong.returncode == 2
