"""Shared fixtures: tiny models built once per run, real neuron processes per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helexa.core.tiny_model import TINY_REPO_ID, write_tiny_model, write_tiny_model_to_hf_cache
from tests.support.procs import Daemon, start_neuron

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF_REPO_ID = "helexa/tiny-qwen3-gguf"
LOCAL_MODEL = "local-tiny"


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    write_tiny_model_to_hf_cache(cache, TINY_REPO_ID)
    write_tiny_model_to_hf_cache(cache, GGUF_REPO_ID, with_gguf=True, gguf_only=True)
    return cache


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_model(root / LOCAL_MODEL)
    bogus = root / "bogus-arch"
    write_tiny_model(bogus)
    config = (bogus / "config.json").read_text().replace('"qwen3"', '"no_such_arch"')
    (bogus / "config.json").write_text(config)
    return root


@pytest.fixture(scope="session")
def neuron(
    tmp_path_factory: pytest.TempPathFactory, hf_cache: Path, model_dir: Path
) -> Iterator[tuple[Daemon, str]]:
    """One real neuron for the API tests, the tiny model pre-warmed."""
    work = tmp_path_factory.mktemp("neuron")
    daemon, base = start_neuron(
        work,
        f"""
model_dirs = ["{model_dir}"]
keepalive_s = 0.005
[admission]
max_concurrent = 2
max_queue = 2
queue_timeout_s = 20
[[default_models]]
model_id = "{TINY_REPO_ID}"
""",
        hf_cache=hf_cache,
    )
    yield daemon, base
    daemon.stop()
