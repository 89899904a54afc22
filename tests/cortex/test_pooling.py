"""Pooling with real processes on loopback (docs/pooling.md): three neurons whose memory
budgets are each too small for the real GGUF; cortex places it across two of them (a
borrower and a donor's ggml RPC server). The greedy answer equals one neuron's; the donor's
/health shows the loan; an address cortex did not name is refused at the donor's port;
unloading gives every host its memory back; a donor that stops answering (SIGSTOP) fails
the stream after the stall timeout instead of hanging it; kill -9 of the donor mid-stream fails the
stream at once, the borrower drops the model, and the next request is placed afresh;
kill -9 of the borrower and its donor ends the loan by itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REAL_CACHE, REAL_GGUF
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, console_script, start_neuron, wait_for

CONTEXT = 2048  # SmolLM2's Q4_1 file (94 MB) + this KV (45 MB) = 139 MB: more than a budget
BUDGET_MB = 100

CONFIG = """
model_dirs = ["{cache}"]
harnesses = [{{name = "llamacpp"}}]
[cpu]
memory_mb = {budget}
[harness.llamacpp]
context_tokens = {context}
slots = 2
flash_attn = true
[rpc]
ports = [{lo}, {hi}]
idle_grace_s = 2
stall_timeout_s = 4
"""

QUESTION = {
    "model": REAL_GGUF,
    "messages": [{"role": "user", "content": "What is the capital of France? Say why."}],
    "max_tokens": 32,
    "temperature": 0,
}


def neuron_config(budget: int, ports: int) -> str:
    lo = 50200 + ports * 10
    return CONFIG.format(cache=REAL_CACHE, budget=budget, context=CONTEXT, lo=lo, hi=lo + 9)


@dataclass
class Fleet:
    neurons: dict[str, tuple[Daemon, str]]
    cortex: Daemon
    api: str
    reference: str  # one neuron with room for the whole model, for the greedy answer


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, hf_cache: Path, real_models: tuple[Path, Path]
) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("pooling")
    neurons = {
        name: start_neuron(
            work / name, neuron_config(BUDGET_MB, index), hf_cache=hf_cache, name=name
        )
        for index, name in enumerate(("n1", "n2", "n3"))
    }
    whole = neuron_config(1024, 3) + f'[[default_models]]\nmodel_id = "{REAL_GGUF}"\n'
    reference = start_neuron(work / "ref", whole, hf_cache=hf_cache, name="ref")
    cortex, api, _metrics = start_cortex(
        work / "cortex",
        {name: base for name, (_d, base) in neurons.items()},
        f'[[models]]\nid = "{REAL_GGUF}"\nmin_devices = 0\n',
    )
    yield Fleet(neurons, cortex, api, reference[1])
    cortex.stop()
    for daemon, _base in [*neurons.values(), reference]:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()


def health(base: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{base}/health", timeout=5).json()


def location(api: str) -> dict | None:  # type: ignore[type-arg]
    listing = httpx.get(f"{api}/v1/models", timeout=5).json()["data"]
    entry = next(m for m in listing if m["id"] == REAL_GGUF)
    return next((loc for loc in entry["locations"] if loc["status"] == "loaded"), None)


def answer(base: str) -> str:
    response = httpx.post(f"{base}/v1/chat/completions", json=QUESTION, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def unload(fleet: Fleet) -> None:
    response = httpx.post(
        f"{fleet.api}/admin/models/unload", json={"model_id": REAL_GGUF}, timeout=60
    )
    assert response.status_code == 200, response.text


def refused(endpoint: str) -> bool:
    """Whether a connection from 127.0.0.2 (an address cortex did not name) to a donor's
    RPC port is reset before anything is exchanged."""
    host, _, port = endpoint.rpartition(":")
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(5)
        try:  # on loopback the reset may beat connect() back
            sock.connect((host, int(port)))
            sock.sendall(b"\x00" * 16)  # what a client's hello would start with
            return sock.recv(64) == b""
        except ConnectionResetError:
            return True


def test_a_model_too_big_for_any_one_neuron_is_served_across_two(fleet: Fleet) -> None:
    expected = answer(fleet.reference)  # the same model, whole on one neuron
    assert answer(fleet.api) == expected

    where = location(fleet.api)
    assert where is not None and where["pool"] is not None, where
    borrower_base = fleet.neurons[where["node"]][1]

    # What the neuron promises holds for a pooled model: batching (two at once, the same
    # greedy answer), prefix reuse (the second turn of a prompt), grammars (JSON mode).
    hits = health(borrower_base)["models"][REAL_GGUF]["prefix_cache"]["hits"]
    with ThreadPoolExecutor(2) as pool_of_two:
        assert list(pool_of_two.map(lambda _i: answer(fleet.api), range(2))) == [expected] * 2
    assert health(borrower_base)["models"][REAL_GGUF]["prefix_cache"]["hits"] > hits
    as_json = {**QUESTION, "response_format": {"type": "json_object"}, "max_tokens": 48}
    reply = httpx.post(f"{fleet.api}/v1/chat/completions", json=as_json, timeout=120)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    if choice["finish_reason"] == "stop":  # whole: it parses (cut short it may not)
        json.loads(choice["message"]["content"])
    else:
        assert choice["message"]["content"].lstrip().startswith(("{", "["))

    pool = where["pool"]
    assert pool["borrower"] == where["node"]
    assert len(pool["donors"]) == 1  # the fewest donors: one covers the rest
    donor = pool["donors"][0]
    assert donor["node"] != where["node"] and donor["device"] == "cpu"
    assert pool["local_mb"] + donor["mb"] > BUDGET_MB

    donor_health = health(fleet.neurons[donor["node"]][1])
    (loan,) = donor_health["loans"]
    assert loan["model_id"] == REAL_GGUF and loan["borrower"] == "127.0.0.1"
    assert loan["allowed"] == ["127.0.0.1"] and loan["state"] == "connected"
    assert loan["mb"] == donor["mb"] and loan["endpoint"] == donor["endpoint"]
    assert donor_health["cpu"]["lent_mb"] == donor["mb"]
    assert donor_health["cpu"]["memory_free_mb"] <= BUDGET_MB - donor["mb"]
    donor_base = fleet.neurons[donor["node"]][1]
    wait_for(  # its share of the weights went over the wire (reported each second)
        "the loan's traffic",
        lambda: health(donor_base)["loans"][0]["bytes_to_donor"] > 10_000_000,
    )

    # The RPC port answers the borrower only: 127.0.0.2 is reset before the handshake.
    assert refused(loan["endpoint"])
    wait_for(
        "the refusal counted",
        lambda: health(donor_base)["loans"][0]["refused"] >= 1,
    )
    status = httpx.get(f"{fleet.api}/admin/fleet", timeout=5).json()
    lending = next(n for n in status["neurons"] if n["name"] == donor["node"])
    assert lending["cpu"]["lent_mb"] == donor["mb"] and lending["loans"]
    table = subprocess.run(
        [console_script("cortex"), "status", "--endpoint", fleet.api],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert f"{donor['mb']} MB lent" in table  # the donor's memory column
    assert f"+ {donor['node']} cpu {donor['mb']} MB" in table  # the model's split

    unload(fleet)

    def all_free() -> bool:
        for _daemon, base in fleet.neurons.values():
            h = health(base)
            if h["loans"] or h["cpu"]["lent_mb"] or h["cpu"]["memory_used_mb"]:
                return False
            if any(w["device"].startswith("pool:") for w in h["workers"]):
                return False
        return True

    wait_for("every host's memory back", all_free, timeout=20)


def stream_until_broken(api: str, after_tokens: int, act: Callable[[], None]) -> tuple[str, float]:
    """A long greedy stream through cortex; ``act`` once ``after_tokens`` chunks came.
    Returns the error message it ended with and how long after ``act`` it ended."""
    body = {**QUESTION, "max_tokens": 400, "stream": True, "messages": [
        {"role": "user", "content": "Tell me a long story about a lighthouse keeper."}
    ]}  # fmt: skip
    events: list[str] = []
    with httpx.stream("POST", f"{api}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:  # a few tokens first: the model is decoding across the hosts
            if line.startswith("data: {"):
                events.append(line)
            if len(events) >= after_tokens:
                break
        act()
        acted = time.monotonic()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
        ended = time.monotonic()
    errors = [json.loads(e[6:]) for e in events if '"error"' in e]
    assert errors, events[-3:]
    return errors[-1]["error"]["message"], ended - acted


def borrower_dropped(fleet: Fleet, borrower: str) -> bool:
    models = httpx.get(f"{fleet.neurons[borrower][1]}/models", timeout=5).json()
    return not any(m["id"] == REAL_GGUF for m in models)


def test_a_donor_that_stops_answering_fails_the_stream_not_hangs_it(fleet: Fleet) -> None:
    assert answer(fleet.api)
    where = location(fleet.api)
    assert where is not None and where["pool"] is not None
    borrower, donor = where["node"], where["pool"]["donors"][0]["node"]
    (loan,) = health(fleet.neurons[donor][1])["loans"]
    stopped = loan["pid"]  # the donor's RPC server process: its socket open, silent
    try:
        message, took = stream_until_broken(fleet.api, 3, lambda: os.kill(stopped, signal.SIGSTOP))
        assert "generated nothing for" in message and "pooled model" in message, message
        assert took < 15  # stall_timeout_s = 4, then the kill
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_for("the borrower to drop the model", lambda: borrower_dropped(fleet, borrower))
    wait_for(  # the borrower's connections closed: the donor ends the loan itself
        "the donor's loan to end", lambda: not health(fleet.neurons[donor][1])["loans"], 20
    )


def test_losing_the_donor_mid_stream_fails_fast_and_the_next_request_replans(
    fleet: Fleet,
) -> None:
    assert answer(fleet.api)  # placed again (the previous test's was dropped)
    where = location(fleet.api)
    assert where is not None and where["pool"] is not None
    borrower = where["node"]
    donor = where["pool"]["donors"][0]["node"]
    message, took = stream_until_broken(
        fleet.api, 3, lambda: fleet.neurons[donor][0].signal(signal.SIGKILL)
    )
    assert took < 10, "the stream must end soon after its donor dies, not hang"
    assert "donor" in message and "pooled model" in message, message

    def dropped() -> bool:
        return borrower_dropped(fleet, borrower)

    wait_for("the borrower to drop the model", dropped, timeout=10)
    # The next request is planned afresh over the two neurons left.
    assert answer(fleet.api)
    again = location(fleet.api)
    assert again is not None and again["pool"] is not None
    hosts = {again["node"], *(d["node"] for d in again["pool"]["donors"])}
    assert donor not in hosts and len(hosts) == 2


def test_a_borrower_killed_leaves_no_loan_behind(fleet: Fleet) -> None:
    assert answer(fleet.api)  # pooled over the two neurons left by the previous test
    where = location(fleet.api)
    assert where is not None and where["pool"] is not None
    borrower = where["node"]
    donor = where["pool"]["donors"][0]["node"]
    donor_base = fleet.neurons[donor][1]
    assert health(donor_base)["loans"]
    fleet.neurons[borrower][0].signal(signal.SIGKILL)  # its worker dies with it

    def returned() -> bool:
        h = health(donor_base)
        return not h["loans"] and h["cpu"]["lent_mb"] == 0

    wait_for("the donor to end the loan on its own", returned, timeout=20)
    assert "the borrower has been disconnected" in fleet.neurons[donor][0].log()
