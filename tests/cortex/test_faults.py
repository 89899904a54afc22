"""cortex under faults: a hung neuron, a draining one, running out of file descriptors.
Real cortex processes in front of scripted stand-in neurons (cheap to start, and their
cues make a fault happen on one of them exactly when a test wants it)."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, free_port

MODEL = "scripted/qwen"
MODELS_TOML = f'[[models]]\nid = "{MODEL}"\nvram_mb = 1\nmin_devices = 0\n'
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Pair:
    cortex: Daemon
    base: str
    metrics: str
    neurons: dict[str, Daemon]


def start_scripted(work: Path, name: str) -> tuple[Daemon, str]:
    port = free_port()
    script = [sys.executable, "-m", "tests.support.scripted_neuron"]
    daemon = Daemon(
        [*script, "--port", str(port), "--name", name],
        log_path=work / f"{name}.log",
        cwd=REPO_ROOT,
    ).start()
    url = f"http://127.0.0.1:{port}"
    daemon.wait_http(f"{url}/health")
    return daemon, url


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Two stand-in neurons serving the same model behind a cortex that polls fast."""
    work = tmp_path_factory.mktemp("faults")
    neurons = {name: start_scripted(work, name) for name in ("s1", "s2")}
    cortex, base, metrics = start_cortex(
        work,
        {name: url for name, (_d, url) in neurons.items()},
        MODELS_TOML,
        poll_interval_s=0.3,
        poller="timeout_s = 0.5\nunhealthy_after = 2\n",
    )
    yield Pair(cortex, base, metrics, {n: d for n, (d, _u) in neurons.items()})
    cortex.stop()
    for daemon, _url in neurons.values():
        daemon.stop()


def chat(base: str, text: str, timeout: float = 60) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout)


def nodes_of(log: str, path: str = "/v1/chat/completions") -> list[str]:
    return [
        part.removeprefix("node=")
        for line in log.splitlines()
        if "msg=request" in line and f"path={path}" in line
        for part in line.split()
        if part.startswith("node=")
    ]


def wait_healthy(base: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/health").json()["nodes"]["healthy"] == count:
            return
        time.sleep(0.1)
    raise AssertionError(f"not {count} healthy neurons after {timeout}s")


def test_a_hung_neuron_gets_no_new_requests_and_its_waiting_ones_fail_over(pair: Pair) -> None:
    """SIGSTOP: the neuron accepts connections and says nothing. The requests already sent
    to it fail over to the other replica once the poller sees it dead (not after
    generation_timeout_s, 1800 s), and new requests go to the other one."""
    wait_healthy(pair.base, 2)
    hung = pair.neurons["s1"]
    assert hung.proc is not None
    hung.signal(signal.SIGSTOP)
    try:
        answers: list[httpx.Response] = []

        async def burst() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
                answers.extend(
                    await asyncio.gather(
                        *(
                            client.post(f"{pair.base}/v1/chat/completions", json=body)
                            for _ in range(4)
                        )
                    )
                )

        asyncio.run(burst())
        assert [a.status_code for a in answers] == [200] * 4
        log = pair.cortex.log()
        assert "neuron unhealthy" in log and "neuron=s1" in log
        assert "retry on another neuron" in log
        assert chat(pair.base, "after").status_code == 200
        assert nodes_of(pair.cortex.log())[-5:] == ["s2"] * 5
    finally:
        hung.signal(signal.SIGCONT)
    wait_healthy(pair.base, 2)


def test_a_request_queued_on_a_draining_neuron_is_retried_on_another(pair: Pair) -> None:
    wait_healthy(pair.base, 2)
    before = len(nodes_of(pair.cortex.log()))
    answer = chat(pair.base, "DRAIN:s1 then answer")  # s1 (first listed) is shutting down
    assert answer.status_code == 200, answer.text
    assert nodes_of(pair.cortex.log())[before:] == ["s2"]
    log = pair.cortex.log()
    assert "reason=draining" in log


def test_running_out_of_file_descriptors_does_not_blame_the_neuron(
    tmp_path: Path, pair: Pair
) -> None:
    """cortex with a 128-file limit and 200 concurrent streams: some are refused, cleanly,
    with cortex's own 503; the neuron stays healthy and serves the next request."""
    neuron_url = next(
        line.split("endpoint = ")[1].strip('"')
        for line in (pair.cortex.log_path.parent / "cortex.toml").read_text().splitlines()
        if line.startswith("endpoint") and "s1" not in line
    )
    limit = (
        "import os, resource, sys;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128));"
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    cortex, base, _metrics = start_cortex(
        tmp_path,
        {"only": neuron_url},
        MODELS_TOML,
        name="tight",
        prefix=[sys.executable, "-c", limit],
    )
    try:
        statuses: list[int | str] = []

        async def one(client: httpx.AsyncClient) -> None:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "SLOW:2"}],
                "stream": True,
            }
            try:
                async with client.stream(
                    "POST", f"{base}/v1/chat/completions", json=body
                ) as response:
                    await response.aread()
                    statuses.append(response.status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

        async def burst() -> None:
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                await asyncio.gather(*(one(client) for _ in range(200)))

        asyncio.run(burst())
        assert 200 in statuses
        assert statuses.count(200) < 200, "the limit was never reached: the test shows nothing"
        time.sleep(1.0)  # a few poll rounds after the burst
        log = cortex.log()
        assert "neuron unhealthy" not in log and "neuron unresponsive" not in log
        assert httpx.get(f"{base}/health").json()["nodes"] == {"healthy": 1, "total": 1}
        assert chat(base, "after the burst").status_code == 200
    finally:
        cortex.stop()


def test_an_upstream_timeout_is_counted_against_its_node(tmp_path: Path, pair: Pair) -> None:
    """A neuron that accepts a stream and sends nothing, not even headers, for longer than
    proxy.idle_timeout_s: a 503 upstream_timeout whose access-log line and error count
    name that neuron (not node="")."""
    neuron_url = next(
        line.split("endpoint = ")[1].strip('"')
        for line in (pair.cortex.log_path.parent / "cortex.toml").read_text().splitlines()
        if line.startswith("endpoint") and "s1" not in line
    )
    cortex, base, metrics = start_cortex(
        tmp_path, {"only": neuron_url}, MODELS_TOML, extra="[proxy]\nidle_timeout_s = 1.0\n"
    )
    try:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "SLOW:3"}],
            "stream": True,
        }
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "upstream_timeout"
        line = [x for x in cortex.log().splitlines() if "msg=request" in x and "status=503" in x]
        assert line and "node=only" in line[-1] and "error=upstream_timeout" in line[-1]
        text = httpx.get(f"{metrics}/metrics").text
        assert re.search(
            r'cortex_request_errors_total\{model="scripted/qwen",node="only",'
            r'reason="upstream_timeout"\} 1\.0',
            text,
        ), text
    finally:
        cortex.stop()
