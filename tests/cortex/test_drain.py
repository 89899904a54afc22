"""Shutting down under load, through cortex: a neuron's SIGTERM (its streams finish, cortex
routes around it), cortex's own SIGTERM (streams finish, or end with an error event at its
deadline), and streams that queue on a busy neuron (waiting is not silence). Real cortex
and neuron processes with tiny models."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from helexa.core.errors import ApiError
from helexa.cortex.drain import Drain
from helexa.cortex.relay import stream_failure
from helexa.cortex.upstream import GatewayShutdown, UpstreamError, UpstreamTimeout
from tests.cortex.conftest import Fleet, _start_neurons, cpu_models
from tests.support.fleet import start_cortex
from tests.support.procs import wait_for

MODEL = "helexa/tiny-a"
MSGS = [{"role": "user", "content": "Tell me about the weather in the city."}]


def requests_logged(log: str, path: str = "/v1/chat/completions") -> list[str]:
    return [line for line in log.splitlines() if "msg=request" in line and f"path={path}" in line]


@dataclass
class Consumer:
    """One streamed request read in a thread: its SSE lines, and an event once a few
    frames have arrived (the generation is running)."""

    url: str
    body: dict
    lines: list[str] = field(default_factory=list)
    status: int | None = None
    broken: list[Exception] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Consumer:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=60) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    self.lines.append(line)
                    if sum(x.startswith("data: ") for x in self.lines) == 4:
                        self.started.set()
        except httpx.HTTPError as exc:  # a body cut off mid-transfer
            self.broken.append(exc)
        finally:
            self.started.set()

    def join(self, timeout: float = 60) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream never ended"

    def data(self) -> list[str]:
        return [x.removeprefix("data: ") for x in self.lines if x.startswith("data: ")]

    def events(self) -> list[str]:
        return [x.removeprefix("event: ") for x in self.lines if x.startswith("event: ")]


def chat_stream(base: str, max_tokens: int = 1000) -> Consumer:
    body = {
        "model": MODEL,
        "messages": MSGS,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    return Consumer(f"{base}/v1/chat/completions", body)


def messages_stream(base: str, max_tokens: int = 1000) -> Consumer:
    body = {
        "model": MODEL,
        "messages": MSGS,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    return Consumer(f"{base}/v1/messages", body)


# --- decisions, in process ------------------------------------------------------------------


def test_cortexs_drain_deadline_turns_a_request_still_routing_into_a_503() -> None:
    """At the deadline a request still being routed (a cold load, a neuron's answer not
    begun) ends as a 503 shutting_down, in its route's envelope (not uvicorn's plain-text
    500 at its own deadline); another cancellation (the client left) passes through."""

    async def scenario() -> None:
        drain = Drain(0.05)
        waiting = asyncio.ensure_future(drain.routing(asyncio.sleep(30)))
        left = asyncio.ensure_future(Drain(60).routing(asyncio.sleep(30)))
        await asyncio.sleep(0)
        drain.begin()
        with pytest.raises(ApiError) as info:
            await waiting
        assert info.value.status == 503 and info.value.code == "shutting_down"
        assert "drain deadline (0.05s)" in info.value.message
        with pytest.raises(ApiError):  # after the cut nothing new starts
            await drain.routing(asyncio.sleep(0))
        left.cancel()
        with pytest.raises(asyncio.CancelledError):
            await left

    asyncio.run(scenario())


def test_the_error_event_that_ends_a_broken_stream_says_whose_fault() -> None:
    assert stream_failure(GatewayShutdown("cortex is shutting down"), "n1") == (
        503,
        "shutting_down",
        "cortex is shutting down",
    )
    assert stream_failure(UpstreamTimeout("silent"), "n1")[:2] == (502, "upstream_timeout")
    status, code, message = stream_failure(UpstreamError("EOF"), "n1")
    assert (status, code) == (502, "upstream_broken") and "neuron n1" in message


# --- real processes ---------------------------------------------------------------------------


@pytest.fixture
def two(tmp_path: Path, fleet_cache: Path) -> Iterator[Fleet]:
    """n1 serves the model (four generations at once); n2 could load it; a cortex that
    polls every 0.3 s in front of both."""
    # KV room for four long streams at once (none preempted and recomputed).
    budget = (
        "keepalive_s = 0.5\ndrain_timeout_s = 60\n[cpu]\nmemory_mb = 200\n"
        "[harness.transformers]\nkv_cache_mb = 24\n"
    )
    neurons = _start_neurons(
        tmp_path,
        fleet_cache,
        {
            "n1": budget
            + f'[admission]\nmax_concurrent = 4\n[[default_models]]\nmodel_id = "{MODEL}"\n',
            "n2": budget,
        },
    )
    cortex, base, metrics = start_cortex(
        tmp_path, {n: u for n, (_d, u) in neurons.items()}, cpu_models(MODEL)
    )
    yield Fleet(cortex, base, metrics, neurons)
    cortex.stop()
    for daemon, _ in neurons.values():
        daemon.stop()


def test_a_neuron_draining_behind_cortex_finishes_its_streams(two: Fleet) -> None:
    """SIGTERM on the neuron serving four streams through cortex: the neuron keeps
    answering /health (draining) while they finish, so cortex leaves them alone and every
    one ends properly ([DONE], message_stop); a new request meanwhile goes to the other
    neuron, never to the draining one."""
    n1, n1_url = two.neurons["n1"]
    streams = [chat_stream(two.base) for _ in range(3)] + [messages_stream(two.base)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(60)
    assert all(s.status == 200 for s in streams), [s.lines[:3] for s in streams]

    n1.signal(signal.SIGTERM)
    wait_for("draining", lambda: httpx.get(f"{n1_url}/health").json()["draining"])
    health = httpx.get(f"{n1_url}/health").json()
    assert health["status"] == "draining"
    time.sleep(1.0)  # a few of cortex's poll rounds: it has seen the drain
    assert all(s.thread and s.thread.is_alive() for s in streams), "streams ended early"
    on_n1 = len(requests_logged(n1.log()))
    answer = httpx.post(
        f"{two.base}/v1/chat/completions",
        json={"model": MODEL, "messages": MSGS, "max_tokens": 4},
        timeout=60,
    )
    assert answer.status_code in (200, 503), answer.text
    assert len(requests_logged(n1.log())) == on_n1, "a new request reached the draining neuron"
    if answer.status_code == 200:
        assert requests_logged(two.cortex.log())[-1].count("node=n2") == 1

    for stream in streams:
        stream.join()
    assert n1.proc is not None and n1.proc.wait(60) == 0
    for stream in streams[:3]:
        assert not stream.broken, stream.broken
        frames = stream.data()
        assert frames[-1] == "[DONE]", frames[-3:]
        final = json.loads(frames[-2])
        assert final["choices"][0]["finish_reason"] in {"stop", "length"}
    anthropic_stream = streams[3]
    assert not anthropic_stream.broken, anthropic_stream.broken
    assert anthropic_stream.events()[-1] == "message_stop", anthropic_stream.events()[-3:]
    assert "error" not in anthropic_stream.events()
    log = two.cortex.log()
    assert "stream broke" not in log
    assert "stopped answering health checks" not in log


def test_streams_waiting_for_a_slot_are_not_silence(tmp_path: Path, fleet_cache: Path) -> None:
    """One generation at a time on the neuron, twenty streams at once through a cortex
    whose idle timeout (2 s) is far shorter than the queue wait: the queued streams get
    their headers, opening chunk and keep-alives at once, so every one completes; none is
    a 503 upstream_timeout while the neuron's queue has room; a queued Anthropic stream's
    message_start still carries the real input token count."""
    neurons = _start_neurons(
        tmp_path,
        fleet_cache,
        {
            "q1": "keepalive_s = 0.2\n[cpu]\nmemory_mb = 200\n"
            "[admission]\nmax_concurrent = 1\nmax_queue = 32\nqueue_timeout_s = 300\n"
            f'[[default_models]]\nmodel_id = "{MODEL}"\n'
        },
    )
    cortex, base, _metrics = start_cortex(
        tmp_path,
        {n: u for n, (_d, u) in neurons.items()},
        cpu_models(MODEL),
        extra="[proxy]\nidle_timeout_s = 2.0\n",
    )
    try:
        outcomes: list[tuple[int, str]] = []
        input_tokens: list[int] = []

        async def one(client: httpx.AsyncClient, path: str) -> None:
            body = {
                "model": MODEL,
                "messages": MSGS,
                "max_tokens": 120,
                "temperature": 0,
                "stream": True,
            }
            async with client.stream("POST", f"{base}{path}", json=body) as r:
                text = (await r.aread()).decode()
            last = text.rstrip().rsplit("\n", 1)[-1]
            if path == "/v1/messages":  # message_start came first, with the real count
                start = json.loads(text.split("data: ", 1)[1].split("\n", 1)[0])
                input_tokens.append(start["message"]["usage"]["input_tokens"])
                last = "data: [DONE]" if '"type":"message_stop"' in last else last
            outcomes.append((r.status_code, last))

        async def burst() -> None:
            paths = ["/v1/chat/completions"] * 16 + ["/v1/messages"] * 4
            async with httpx.AsyncClient(timeout=300) as client:
                await asyncio.gather(*(one(client, path) for path in paths))

        started = time.monotonic()
        asyncio.run(burst())
        elapsed = time.monotonic() - started
        assert outcomes == [(200, "data: [DONE]")] * 20, outcomes
        assert elapsed > 4.0, "the queue never waited past the idle timeout: shows nothing"
        assert len(input_tokens) == 4 and min(input_tokens) > 5, input_tokens
        assert "upstream_timeout" not in cortex.log()
    finally:
        cortex.stop()
        for daemon, _ in neurons.values():
            daemon.stop()


def test_a_stream_the_neurons_drain_deadline_cuts_is_logged_and_counted_as_broken(
    tmp_path: Path, fleet_cache: Path
) -> None:
    """A neuron whose drain deadline (1 s) is shorter than its streams: each ends with the
    neuron's shutting_down error event in its client's protocol and a clean end of body;
    cortex's access log says the request broke (outcome, error code, node) and the error
    count has it with its model and node, although the status was 200."""
    neurons = _start_neurons(
        tmp_path,
        fleet_cache,
        {
            "d1": "keepalive_s = 0.5\ndrain_timeout_s = 1\n[cpu]\nmemory_mb = 200\n"
            "[harness.transformers]\nkv_cache_mb = 24\n"
            f'[[default_models]]\nmodel_id = "{MODEL}"\n'
        },
    )
    cortex, base, metrics = start_cortex(
        tmp_path, {n: u for n, (_d, u) in neurons.items()}, cpu_models(MODEL)
    )
    try:
        streams = [chat_stream(base, 1900), messages_stream(base, 1900)]
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.started.wait(60)
        neurons["d1"][0].signal(signal.SIGTERM)
        for stream in streams:
            stream.join()
        openai_stream, anthropic_stream = streams
        assert not openai_stream.broken and not anthropic_stream.broken
        assert "[DONE]" not in openai_stream.data()
        assert json.loads(openai_stream.data()[-1])["error"]["code"] == "shutting_down"
        assert anthropic_stream.events()[-1] == "error"
        assert json.loads(anthropic_stream.data()[-1])["error"]["type"] == "overloaded_error"

        def broken() -> list[str]:
            return [
                line
                for line in requests_logged(cortex.log())
                + requests_logged(cortex.log(), "/v1/messages")
                if "outcome=broken" in line
            ]

        wait_for("two broken-stream lines", lambda: len(broken()) == 2)
        for line in broken():
            assert "status=200" in line and "error=shutting_down" in line and "node=d1" in line
        text = httpx.get(f"{metrics}/metrics").text
        assert (
            f'cortex_request_errors_total{{model="{MODEL}",node="d1",reason="shutting_down"}} 2.0'
            in text
        ), text
    finally:
        cortex.stop()
        for daemon, _ in neurons.values():
            daemon.stop()


def test_cortex_sigterm_lets_streams_finish_and_ends_the_rest_with_an_error_event(
    tmp_path: Path, fleet_cache: Path
) -> None:
    """cortex's own SIGTERM with a 3 s drain deadline: it stops accepting at once; a stream
    that finishes in time ends as usual; every stream still running at the deadline — in
    each protocol — ends with that protocol's error event and a clean end of body (never a
    truncated chunked transfer); cortex exits 0."""
    neurons = _start_neurons(
        tmp_path,
        fleet_cache,
        {
            "n": "keepalive_s = 0.5\n[cpu]\nmemory_mb = 200\n"
            "[harness.transformers]\nkv_cache_mb = 24\n[admission]\nmax_concurrent = 5\n"
            f'[[default_models]]\nmodel_id = "{MODEL}"\n'
        },
    )
    cortex, base, _metrics = start_cortex(
        tmp_path,
        {n: u for n, (_d, u) in neurons.items()},
        cpu_models(MODEL),
        gateway="drain_timeout_s = 3",
    )
    try:
        long = 1900  # far past the deadline
        short = chat_stream(base, 60)  # well inside the deadline
        chat = chat_stream(base, long)
        messages = messages_stream(base, long)
        completions = Consumer(
            f"{base}/v1/completions",
            {"model": MODEL, "prompt": "The weather", "max_tokens": long, "temperature": 0}
            | {"stream": True},
        )
        responses = Consumer(
            f"{base}/v1/responses",
            {"model": MODEL, "input": MSGS[0]["content"], "max_output_tokens": long}
            | {"temperature": 0, "stream": True},
        )
        streams = [chat, messages, completions, responses]
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.started.wait(60)
        assert short.start().started.wait(60)
        cortex.signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{base}/health", timeout=2)
        for stream in (short, *streams):
            stream.join()
        assert cortex.proc is not None and cortex.proc.wait(30) == 0

        assert short.data()[-1] == "[DONE]"  # finished within the deadline
        for stream in streams:
            assert stream.status == 200 and not stream.broken, (stream.url, stream.broken)
        for stream in (chat, completions):
            assert "[DONE]" not in stream.data()
            error = json.loads(stream.data()[-1])["error"]
            assert error["code"] == "shutting_down" and "drain deadline (3s)" in error["message"]
        assert messages.events()[-1] == "error"
        assert json.loads(messages.data()[-1])["error"]["type"] == "overloaded_error"
        assert responses.events()[-1] == "response.failed"
        assert "drain deadline" in json.loads(responses.data()[-1])["response"]["error"]["message"]
        log = cortex.log()
        assert "drain deadline: requests cut" in log
        assert "Cancel" not in log  # uvicorn's own backstop was not needed
        broken = [x for x in log.splitlines() if "msg=request" in x and "outcome=broken" in x]
        assert len(broken) == 4 and all("error=shutting_down" in x for x in broken), broken
    finally:
        cortex.stop()
        for daemon, _ in neurons.values():
            daemon.stop()
