"""helexa-acp end to end: a real cortex in front of the scripted stand-in neuron (tool
calls on cue: tests/support/scripted_neuron.py, `ACP:` cues), and a real cortex in front
of a real neuron serving a tiny random model for a plain chat."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from helexa.up.tiny_model import DEMO_SHAPE, write_tiny_model_to_hf_cache
from tests.acp.harness import agent_env
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, free_port, start_neuron

REPO = Path(__file__).resolve().parents[2]
TINY_ACP = "helexa/tiny-acp"


@dataclass
class Upstream:
    cortex: Daemon
    base: str  # cortex, without /v1
    neuron: Daemon
    neuron_url: str

    def received(self) -> list[dict[str, Any]]:
        """Every chat body the scripted neuron got, oldest first."""
        return httpx.get(f"{self.neuron_url}/_received", timeout=10).json()


@pytest.fixture(scope="session")
def acp_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    work = tmp_path_factory.mktemp("acp-scripted")
    port = free_port()
    neuron = Daemon(
        [sys.executable, "-m", "tests.support.scripted_neuron", "--port", str(port)],
        log_path=work / "scripted.log",
        cwd=REPO,
    ).start()
    url = f"http://127.0.0.1:{port}"
    neuron.wait_http(f"{url}/health")
    models = (
        '[[models]]\nid = "scripted/qwen"\nvram_mb = 1\nmin_devices = 0\n'
        '[aliases]\n"helexa/default" = "scripted/qwen"\n"helexa/alt" = "scripted/qwen"\n'
    )
    cortex, base, _metrics = start_cortex(work, {"scripted": url}, models)
    yield Upstream(cortex, base, neuron, url)
    cortex.stop()
    neuron.stop()


@pytest.fixture(scope="session")
def tiny_upstream(tmp_path_factory: pytest.TempPathFactory, hf_cache: Path) -> Iterator[Upstream]:
    """A real neuron with a tiny random model whose context holds helexa-acp's prompt (the
    demo shape: one layer, a long context, short answers), behind a real cortex."""
    work = tmp_path_factory.mktemp("acp-tiny")
    write_tiny_model_to_hf_cache(hf_cache, TINY_ACP, **DEMO_SHAPE)
    neuron, url = start_neuron(
        work,
        f'keepalive_s = 0.5\n[[default_models]]\nmodel_id = "{TINY_ACP}"\n',
        hf_cache=hf_cache,
        name="tiny-neuron",
    )
    models = f'[[models]]\nid = "{TINY_ACP}"\nvram_mb = 60\nmin_devices = 0\n'
    cortex, base, _metrics = start_cortex(work, {"tiny": url}, models)
    yield Upstream(cortex, base, neuron, url)
    cortex.stop()
    neuron.stop()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The editor's project folder: the session's cwd."""
    path = tmp_path / "project"
    path.mkdir()
    return path


@pytest.fixture
def env(tmp_path: Path, acp_upstream: Upstream) -> dict[str, str]:
    return agent_env(tmp_path / "agent", f"{acp_upstream.base}/v1")
