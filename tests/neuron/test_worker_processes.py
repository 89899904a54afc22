"""Worker processes with a real neuron and the real GGUF: a worker killed mid-stream (SIGKILL,
SIGSEGV, SIGILL) fails only its streams, at once and clearly, while /health answers; the
worker comes back with its model; a model that crashes its worker on every load ends
``failed``; unloading the last model gives the worker's memory back; behind cortex, the
request after a crash is served by the other neuron."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REAL_CACHE, REAL_GGUF
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, start_neuron, wait_for

CONFIG = """
model_dirs = ["{dirs}"]
harnesses = [{name = "llamacpp"}]
[harness.llamacpp]
context_tokens = 2048
slots = 2
[workers]
max_restarts = 5
restart_backoff_s = 0.2
heartbeat_timeout_s = 3
"""


def config(*dirs: Path) -> str:
    return CONFIG.replace('"{dirs}"', ", ".join(f'"{d}"' for d in dirs))


@pytest.fixture(scope="module")
def crashy_dir(tmp_path_factory: pytest.TempPathFactory, real_models: tuple[Path, Path]) -> Path:
    """A model folder whose id the test fault hook matches (the real GGUF, linked)."""
    root = tmp_path_factory.mktemp("crashy")
    (root / "crashy-smol").mkdir()
    (root / "crashy-smol" / real_models[0].name).symlink_to(real_models[0])
    return root


@pytest.fixture(scope="module")
def fleet_neuron(
    tmp_path_factory: pytest.TempPathFactory, hf_cache: Path, crashy_dir: Path
) -> Iterator[tuple[Daemon, str]]:
    work = tmp_path_factory.mktemp("workers")
    daemon, base = start_neuron(
        work,
        config(REAL_CACHE, crashy_dir),
        hf_cache=hf_cache,
        env={"HELEXA_TEST_FAULT": "load:crashy:SIGABRT"},
    )
    yield daemon, base
    daemon.stop()


def health(base: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{base}/health", timeout=10).json()


def cpu_worker(base: str) -> dict:  # type: ignore[type-arg]
    return next(w for w in health(base)["workers"] if w["device"] == "cpu")


def model_status(base: str, model: str) -> dict | None:  # type: ignore[type-arg]
    listing = httpx.get(f"{base}/models", timeout=10).json()
    return next((m for m in listing if m["id"] == model), None)


def load(base: str, model: str, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{base}/models/load", json={"model_id": model}, timeout=timeout)


def ready_worker(base: str, not_pid: int | None = None) -> int:
    """The CPU worker's pid once it is ready (and, given ``not_pid``, a new one)."""
    wait_for(
        "the worker ready",
        lambda: (w := cpu_worker(base))["state"] == "ready" and w["pid"] not in (None, not_pid),
        timeout=60,
    )
    return cpu_worker(base)["pid"]


def ask(base: str, model: str = REAL_GGUF) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "What is 2+2?"}],
            "max_tokens": 12,
            "temperature": 0,
        },
        timeout=120,
    )


class HealthWatch:
    """Polls /health on a thread while something happens: every answer and its time."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.answers: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    status = client.get(f"{self.base}/health").status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((status, time.monotonic() - started))
                time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(15)


def signal_mid_stream(base: str, pid: int, sig: signal.Signals) -> tuple[dict, float]:  # type: ignore[type-arg]
    """Start a long greedy stream, send ``sig`` to the worker at its first token, read the
    stream to its end: its last event, and the seconds from the signal to that end."""
    body = {
        "model": REAL_GGUF,
        "messages": [{"role": "user", "content": "Tell me a very long story about a cat."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    last = ""
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        for line in lines:  # the first token: the engine is generating
            if line.startswith("data:") and '"content"' in line:
                break
        os.kill(pid, sig)
        sent = time.monotonic()
        for line in lines:
            if line.startswith("data:"):
                last = line
        ended_after = time.monotonic() - sent
    return json.loads(last.removeprefix("data: ")), ended_after


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV, signal.SIGILL])
def test_a_worker_killed_mid_stream_fails_its_stream_and_comes_back(
    fleet_neuron: tuple[Daemon, str], sig: signal.Signals
) -> None:
    daemon, base = fleet_neuron
    assert load(base, REAL_GGUF).status_code == 200
    wait_for(
        "the model loaded", lambda: (model_status(base, REAL_GGUF) or {}).get("status") == "loaded"
    )
    pid = ready_worker(base)
    with HealthWatch(base) as watch:
        last, ended_after = signal_mid_stream(base, pid, sig)
    error = last["error"]
    assert error["code"] == "engine_crashed"
    assert f"killed by {sig.name}" in error["message"] and "cpu worker" in error["message"]
    assert ended_after < 10, ended_after  # at once, never a hang (measured in the bench)
    status = model_status(base, REAL_GGUF)
    assert status is not None and sig.name in (status["error"] or "")
    # /health answered all along, while the worker died and another started.
    assert watch.answers and all(code == 200 for code, _ in watch.answers)
    new_pid = ready_worker(base, not_pid=pid)
    wait_for("the model reloaded", lambda: model_status(base, REAL_GGUF)["status"] == "loaded")
    answer = ask(base)
    assert answer.status_code == 200, answer.text
    assert "4" in answer.json()["choices"][0]["message"]["content"]
    assert new_pid != pid
    log = daemon.log()
    assert "worker crashed" in log and f"killed by {sig.name}" in log
    if sig != signal.SIGKILL:  # the worker's own last words (faulthandler) are in the log
        assert "Fatal Python error" in log


def test_a_worker_that_stops_answering_is_killed_and_replaced(
    fleet_neuron: tuple[Daemon, str],
) -> None:
    """SIGSTOP stands in for a worker deadlocked in native code: its socket stays open, so
    only the heartbeat can tell; its stream must end, not hang."""
    daemon, base = fleet_neuron
    if (model_status(base, REAL_GGUF) or {}).get("status") != "loaded":
        assert load(base, REAL_GGUF).status_code == 200
    pid = ready_worker(base)
    last, ended_after = signal_mid_stream(base, pid, signal.SIGSTOP)
    error = last["error"]
    assert error["code"] == "engine_crashed"
    assert "stopped answering" in error["message"], error
    assert ended_after < 30, ended_after
    ready_worker(base, not_pid=pid)
    wait_for("the model reloaded", lambda: model_status(base, REAL_GGUF)["status"] == "loaded")
    assert ask(base).status_code == 200
    assert "worker stopped answering; killing it" in daemon.log()


def test_recycling_a_worker_reloads_its_models_before_answering(
    fleet_neuron: tuple[Daemon, str],
) -> None:
    _daemon, base = fleet_neuron
    refused = httpx.post(f"{base}/workers/recycle", json={"device": "cuda:7"}, timeout=10)
    assert refused.status_code == 400 and "cuda:7" in refused.json()["error"]["message"]
    if (model_status(base, REAL_GGUF) or {}).get("status") != "loaded":
        assert load(base, REAL_GGUF).status_code == 200
    pid = ready_worker(base)
    answer = httpx.post(f"{base}/workers/recycle", json={}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"recycled": ["cpu"]}
    # Back before the answer: a fresh process with the model loaded, no strike, no error.
    status = model_status(base, REAL_GGUF)
    assert status is not None and status["status"] == "loaded" and status["error"] is None
    assert cpu_worker(base)["pid"] != pid
    assert ask(base).status_code == 200


def test_a_model_that_crashes_its_worker_on_every_load_ends_failed(
    fleet_neuron: tuple[Daemon, str],
) -> None:
    daemon, base = fleet_neuron
    answer = load(base, "crashy-smol")
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "engine_crashed"
    assert "SIGABRT" in answer.json()["error"]["message"]
    wait_for(
        "the crashing model given up",
        lambda: (
            "not reloaded again" in ((model_status(base, "crashy-smol") or {}).get("error") or "")
        ),
        timeout=90,
    )
    assert model_status(base, "crashy-smol")["status"] == "failed"  # type: ignore[index]
    info = health(base)["models"]["crashy-smol"]
    assert info["status"] == "failed" and "SIGABRT" in info["error"]
    # A request for it is a clear 503, and the neuron serves its other models.
    refused = ask(base, "crashy-smol")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_crashed"
    ready_worker(base)
    if (model_status(base, REAL_GGUF) or {}).get("status") != "loaded":
        assert load(base, REAL_GGUF).status_code == 200
    wait_for("the real model back", lambda: model_status(base, REAL_GGUF)["status"] == "loaded")
    assert ask(base).status_code == 200
    # Unloading the failed one forgets it.
    gone = httpx.post(f"{base}/models/unload", json={"model_id": "crashy-smol"}, timeout=30)
    assert gone.status_code == 200
    assert model_status(base, "crashy-smol") is None
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_a_poisoned_device_gets_a_fresh_worker(
    tmp_path: Path, hf_cache: Path, crashy_dir: Path
) -> None:
    """A device fault (here the test hook's stand-in for a CUDA error) used to leave the
    device refusing everything until a restart; now its worker process is replaced."""
    daemon, base = start_neuron(
        tmp_path,
        config(REAL_CACHE, crashy_dir),
        hf_cache=hf_cache,
        env={"HELEXA_TEST_FAULT": "poison:crashy"},
    )
    try:
        pid = ready_worker(base)
        first = load(base, "crashy-smol")  # 200, or 503 when the fault beat the reply out
        assert first.status_code == 200 or first.json()["error"]["code"] == "engine_crashed"
        wait_for(
            "the poisoning model given up",
            lambda: (
                "not reloaded again"
                in ((model_status(base, "crashy-smol") or {}).get("error") or "")
            ),
            timeout=90,
        )
        error = model_status(base, "crashy-smol")["error"]  # type: ignore[index]
        assert "device fault on cpu" in error and "illegal memory access" in error
        assert "killed by SIGKILL" in error
        # The device itself works: a fresh worker serves another model.
        ready_worker(base, not_pid=pid)
        assert load(base, REAL_GGUF).status_code == 200
        assert ask(base).status_code == 200
    finally:
        daemon.stop()


def tree_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def test_unloading_the_last_model_returns_the_workers_memory(
    tmp_path: Path, hf_cache: Path, real_models: tuple[Path, Path]
) -> None:
    daemon, base = start_neuron(tmp_path, config(REAL_CACHE), hf_cache=hf_cache)
    try:
        assert daemon.proc is not None
        main = daemon.proc.pid
        pid = ready_worker(base)
        time.sleep(0.5)
        baseline = tree_rss_mb([main, pid])
        assert load(base, REAL_GGUF).status_code == 200
        assert ask(base).status_code == 200
        loaded = tree_rss_mb([main, pid])
        assert loaded > baseline + 40, (baseline, loaded)  # the weights and KV are resident
        gone = httpx.post(f"{base}/models/unload", json={"model_id": REAL_GGUF}, timeout=30)
        assert gone.status_code == 200
        new_pid = ready_worker(base, not_pid=pid)
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
        time.sleep(0.5)
        after = tree_rss_mb([main, new_pid])
        assert after < baseline + 25, (baseline, loaded, after)
        assert "worker recycled" in daemon.log()
    finally:
        daemon.stop()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_behind_cortex_the_request_after_a_crash_is_served_by_the_other_neuron(
    tmp_path: Path, hf_cache: Path, real_models: tuple[Path, Path]
) -> None:
    pinned = config(REAL_CACHE) + f'[[default_models]]\nmodel_id = "{REAL_GGUF}"\n'
    n1, base1 = start_neuron(tmp_path / "n1", pinned, hf_cache=hf_cache, name="n1")
    n2, base2 = start_neuron(tmp_path / "n2", pinned, hf_cache=hf_cache, name="n2")
    cortex, api, _metrics = start_cortex(
        tmp_path / "cortex",
        {"n1": base1, "n2": base2},
        f'[[models]]\nid = "{REAL_GGUF}"\nmin_devices = 0\n',
    )

    def replicas() -> int:
        listing = httpx.get(f"{api}/v1/models", timeout=5).json()["data"]
        entry = next((m for m in listing if m["id"] == REAL_GGUF), {})
        return sum(loc["status"] == "loaded" for loc in entry.get("locations", []))

    try:
        wait_for("cortex seeing both replicas", lambda: replicas() == 2)
        # A first request lands somewhere; crash the worker of whichever neuron served it.
        assert ask(api).status_code == 200
        served_by_n1 = "path=/v1/chat/completions" in n1.log()
        victim, other = (base1, n2) if served_by_n1 else (base2, n1)
        before = other.log().count("path=/v1/chat/completions")
        os.kill(cpu_worker(victim)["pid"], signal.SIGKILL)
        wait_for(
            "the victim's model failed",
            lambda: model_status(victim, REAL_GGUF)["status"] != "loaded",
        )
        for _ in range(3):
            answer = ask(api)
            assert answer.status_code == 200, answer.text
        assert other.log().count("path=/v1/chat/completions") > before
    finally:
        cortex.stop()
        n1.stop()
        n2.stop()
