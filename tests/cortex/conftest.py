"""A small real fleet: three neurons (tiny models, small CPU budgets) behind one cortex,
and a second cortex in front of a single neuron for eviction."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helexa.up.tiny_model import write_tiny_model_to_hf_cache
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, free_port, start_neuron

REPOS = ["helexa/tiny-a", "helexa/tiny-b", "helexa/tiny-c", "helexa/tiny-k", "helexa/tiny-p"]


def cpu_models(*ids: str, vram_mb: int = 60, pinned: dict[str, str] | None = None) -> str:
    """models.toml entries for CPU-capable profiles (optionally pinned to one neuron)."""
    out = ""
    for model_id in ids:
        out += f'[[models]]\nid = "{model_id}"\nvram_mb = {vram_mb}\nmin_devices = 0\n'
        if pinned and model_id in pinned:
            out += f'pinned_on = ["{pinned[model_id]}"]\n'
    return out


@dataclass
class Fleet:
    cortex: Daemon
    base: str
    metrics: str
    neurons: dict[str, tuple[Daemon, str]]

    def neuron_logs(self) -> str:
        return "".join(d.log() for d, _ in self.neurons.values())


@pytest.fixture(scope="session")
def fleet_cache(hf_cache: Path) -> Path:
    for repo in REPOS:
        write_tiny_model_to_hf_cache(hf_cache, repo)
    return hf_cache


def _start_neurons(work: Path, cache: Path, specs: dict[str, str]) -> dict[str, tuple[Daemon, str]]:
    with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
        futures = {
            name: pool.submit(start_neuron, work, toml, hf_cache=cache, name=name)
            for name, toml in specs.items()
        }
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory, fleet_cache: Path) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet")
    budget = "keepalive_s = 0.5\n[cpu]\nmemory_mb = 200\n"
    neurons = _start_neurons(work, fleet_cache, {n: budget for n in ("n1", "n2", "n3")})
    models = cpu_models(
        "helexa/tiny-a",
        "helexa/tiny-b",
        "helexa/tiny-k",
        "helexa/tiny-p",
        "helexa/missing",  # in the catalogue, its weights on no neuron
        pinned={"helexa/tiny-p": "n3"},
    )
    models += """[[models]]
id = "helexa/gpu-only"
vram_mb = 60
min_devices = 1
[aliases]
"helexa/fast" = "helexa/tiny-a"
"""
    cortex, base, metrics = start_cortex(work, {n: u for n, (_d, u) in neurons.items()}, models)
    yield Fleet(cortex, base, metrics, neurons)
    cortex.stop()
    for daemon, _ in neurons.values():
        daemon.stop()


@pytest.fixture(scope="session")
def solo(tmp_path_factory: pytest.TempPathFactory, fleet_cache: Path) -> Iterator[Fleet]:
    """One neuron with room for two 60 MB profiles; a ghost neuron that never answers."""
    work = tmp_path_factory.mktemp("solo")
    neurons = _start_neurons(
        work, fleet_cache, {"solo": "keepalive_s = 0.5\n[cpu]\nmemory_mb = 130\n"}
    )
    models = cpu_models(
        "helexa/tiny-a",
        "helexa/tiny-b",
        "helexa/tiny-c",
        "helexa/tiny-p",
        pinned={"helexa/tiny-p": "solo"},
    )
    models += cpu_models("helexa/haunted", vram_mb=10, pinned={"helexa/haunted": "ghost"})
    endpoints = {"solo": neurons["solo"][1], "ghost": f"http://127.0.0.1:{free_port()}"}
    cortex, base, metrics = start_cortex(
        work, endpoints, models, extra='[eviction]\nstrategy = "lru"\ndefrag_after_cycles = 0\n'
    )
    yield Fleet(cortex, base, metrics, neurons)
    cortex.stop()
    for daemon, _ in neurons.values():
        daemon.stop()


@pytest.fixture(scope="session")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The real cortex in front of a scripted neuron that emits tool calls on cue."""
    import sys

    work = tmp_path_factory.mktemp("scripted")
    port = free_port()
    repo_root = Path(__file__).resolve().parents[2]
    neuron = Daemon(
        [sys.executable, "-m", "tests.support.scripted_neuron", "--port", str(port)],
        log_path=work / "scripted.log",
        cwd=repo_root,
    ).start()
    url = f"http://127.0.0.1:{port}"
    neuron.wait_http(f"{url}/health")
    models = (
        '[[models]]\nid = "scripted/qwen"\nvram_mb = 1\nmin_devices = 0\n'
        '[aliases]\n"claude-test" = "scripted/qwen"\n"helexa/default" = "scripted/qwen"\n'
        '[fallbacks]\n"claude-*" = "scripted/qwen"\n'
    )
    cortex, base, metrics = start_cortex(work, {"scripted": url}, models)
    yield Fleet(cortex, base, metrics, {"scripted": (neuron, url)})
    cortex.stop()
    neuron.stop()
