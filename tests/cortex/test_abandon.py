"""Requests their clients abandon, accounted for honestly: a real cortex in front of a real
neuron. The client leaves mid-generation (streamed or not), or while queued; cortex asks the
neuron to cancel the request by id and reads the rest of its answer, so both access logs say
``status=499 outcome=abandoned`` with the same, exact token count, and cortex's token
counters include it. A neuron without the cancel route (the scripted stand-in) is cut as
before."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.types import Message

from helexa.cortex.abandon import ClientWatch
from helexa.cortex.upstream import Pool
from tests.cortex.conftest import Fleet, _start_neurons, cpu_models
from tests.support.fleet import start_cortex
from tests.support.procs import free_port, wait_for

MODEL = "helexa/tiny-a"
MSGS = [{"role": "user", "content": "Tell me about the weather in the city."}]
LONG = 1900  # far more than the tiny model makes before its client leaves

TEXT = re.compile(r'"(?:content|text)":"[^"]')  # a piece of text, not an empty opening
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def fields(line: str) -> dict[str, str]:
    """A logfmt line's fields (quoted values unquoted)."""
    return {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(line)}


def access_lines(log: str) -> list[dict[str, str]]:
    return [fields(x) for x in log.splitlines() if "msg=request" in x and "request_id=" in x]


def completion_counter(fleet: Fleet) -> float:
    text = httpx.get(f"{fleet.metrics}/metrics").text
    name = f'cortex_completion_tokens_total{{model="{MODEL}"'
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(name))


def tokens_evaluated(fleet: Fleet) -> int:
    """Tokens the neuron's engine evaluated for the model, prompts and generated together."""
    _daemon, url = fleet.neurons["n"]
    batch = httpx.get(f"{url}/health").json()["models"][MODEL].get("batch") or {}
    return int(batch.get("tokens", 0))


def abandoned_lines(fleet: Fleet, path: str, seen: int) -> tuple[dict[str, str], dict[str, str]]:
    """cortex's access-log line for the ``seen``-th abandoned request on ``path`` (counting
    from 0) and the neuron's line for the same request id."""

    def cortex_lines() -> list[dict[str, str]]:
        return [
            x
            for x in access_lines(fleet.cortex.log())
            if x["path"] == path and x["outcome"] == "abandoned"
        ]

    wait_for("cortex's line", lambda: len(cortex_lines()) > seen)
    ours = cortex_lines()[seen]

    def neuron_line() -> dict[str, str] | None:
        lines = access_lines(fleet.neuron_logs())
        return next((x for x in lines if x["request_id"] == ours["request_id"]), None)

    wait_for("the neuron's line", neuron_line)
    theirs = neuron_line()
    assert theirs is not None
    return ours, theirs


# --- the watch, in process -------------------------------------------------------------------


def watched(
    neuron: tuple[Pool, str] | None, answer_first: str = ""
) -> tuple[bool, bool, list[str]]:
    """A request's task under a ClientWatch whose client leaves: (cut by the watch, gone,
    what reached the client). ``answer_first``: "final" sends a whole answer before the
    client leaves, "done" a stream's chunk that completes it, the body not yet ended."""

    async def scenario() -> tuple[bool, bool, list[str]]:
        leave = asyncio.Event()
        sent: list[str] = []

        async def receive() -> Message:
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message["type"])

        watch = ClientWatch(receive, send)
        watch.neuron = neuron
        cut = False
        try:
            if answer_first:
                await watch.send({"type": "http.response.start", "status": 200, "headers": []})
                if answer_first == "done":
                    watch.answered()
                more = answer_first == "done"
                await watch.send({"type": "http.response.body", "body": b"x", "more_body": more})
            leave.set()
            await asyncio.sleep(0.2 if answer_first else 30)
            await watch.send({"type": "http.response.body", "body": b"late"})
        except asyncio.CancelledError:
            cut = watch.left()
            assert cut, "the watch's own cancellation"
        finally:
            watch.close()
        return cut, watch.gone, sent

    return asyncio.run(scenario())


def test_a_client_leaving_before_its_request_reached_a_neuron_ends_it_at_once() -> None:
    assert watched(None) == (True, True, [])


def test_a_neuron_that_cannot_be_asked_to_cancel_gets_the_request_cut() -> None:
    nobody = Pool(f"http://127.0.0.1:{free_port()}")  # refuses connections
    assert watched((nobody, "r1")) == (True, True, [])


def test_the_disconnect_that_follows_a_complete_answer_is_not_a_client_leaving() -> None:
    sent = ["http.response.start", "http.response.body", "http.response.body"]
    assert watched(None, answer_first="final") == (False, False, sent)
    assert watched(None, answer_first="done") == (False, False, sent)  # past its [DONE]


# --- real processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, fleet_cache: Path) -> Iterator[Fleet]:
    """One neuron with one slot (a second request queues) behind one cortex."""
    work = tmp_path_factory.mktemp("abandon")
    neurons = _start_neurons(
        work,
        fleet_cache,
        {
            "n": "keepalive_s = 0.5\n[cpu]\nmemory_mb = 200\n[admission]\nmax_concurrent = 1\n"
            f'[[default_models]]\nmodel_id = "{MODEL}"\n'
        },
    )
    cortex, base, metrics = start_cortex(
        work, {n: u for n, (_d, u) in neurons.items()}, cpu_models(MODEL)
    )
    yield Fleet(cortex, base, metrics, neurons)
    cortex.stop()
    for daemon, _ in neurons.values():
        daemon.stop()


def seen_abandoned(fleet: Fleet, path: str) -> int:
    return sum(
        1
        for x in access_lines(fleet.cortex.log())
        if x["path"] == path and x["outcome"] == "abandoned"
    )


def check_accounted(fleet: Fleet, path: str, seen: int, counter_before: float) -> int:
    """Both lines say 499 abandoned with the same tokens; the counter grew by them."""
    ours, theirs = abandoned_lines(fleet, path, seen)
    assert ours["status"] == "499" and theirs["status"] == "499", (ours, theirs)
    assert theirs["outcome"] == "abandoned"
    assert ours["error"] == "client_disconnected" and ours["node"] == "n"
    assert ours["completion_tokens"] == theirs["completion_tokens"], (ours, theirs)
    assert ours["prompt_tokens"] == theirs["prompt_tokens"], (ours, theirs)
    completion = int(ours["completion_tokens"])
    assert completion_counter(fleet) - counter_before == completion
    return completion


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_stream_abandoned_mid_generation_is_accounted_for(one: Fleet, path: str) -> None:
    seen, before = seen_abandoned(one, path), completion_counter(one)
    body = {"model": MODEL, "messages": MSGS, "max_tokens": LONG, "temperature": 0}
    with httpx.stream("POST", one.base + path, json=body | {"stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        text = 0
        while text < 5:  # a few pieces of text: the generation is well under way
            line = next(lines)
            text += bool(TEXT.search(line))
    # The client is gone (the connection closed with the stream half read).
    completion = check_accounted(one, path, seen, before)
    assert 5 <= completion < LONG


def test_a_client_that_hangs_up_at_done_did_not_abandon_its_stream(one: Fleet) -> None:
    """SDKs stop reading at [DONE] and may close before the body's own end: that client
    had its whole answer (ok, 200), however the race between the two goes."""
    path = "/v1/chat/completions"

    def lines() -> list[dict[str, str]]:
        return [x for x in access_lines(one.cortex.log()) if x["path"] == path]

    before = len(lines())
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 4, "stream": True}
    for _ in range(5):
        with httpx.stream("POST", one.base + path, json=body) as response:
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    break
    wait_for("five lines", lambda: len(lines()) >= before + 5)
    for line in lines()[before:]:
        assert (line["status"], line["outcome"]) == ("200", "ok"), line


def test_a_whole_answer_abandoned_mid_generation_is_accounted_for(one: Fleet) -> None:
    path = "/v1/chat/completions"
    seen, before = seen_abandoned(one, path), completion_counter(one)
    body = {"model": MODEL, "messages": MSGS, "max_tokens": LONG, "temperature": 0}
    leave_mid_generation(one.base, path, body, one)
    completion = check_accounted(one, path, seen, before)
    assert 0 < completion < LONG


def test_a_stream_abandoned_while_queued_costs_its_prompt_alone(one: Fleet) -> None:
    """The only slot is taken; the second stream waits (its opening chunk already came).
    Cancelled there, it leaves the queue: nothing generated, both logs agree."""
    path = "/v1/chat/completions"
    body = {"model": MODEL, "messages": MSGS, "max_tokens": LONG, "temperature": 0}
    with httpx.stream("POST", one.base + path, json=body | {"stream": True}) as first:
        first_lines = first.iter_lines()
        while not TEXT.search(next(first_lines)):
            pass  # generating: the slot is taken
        seen, before = seen_abandoned(one, path), completion_counter(one)
        with httpx.stream("POST", one.base + path, json=body | {"stream": True}) as second:
            assert second.status_code == 200
            assert next(second.iter_lines()).startswith("data: ")  # its opening chunk
        completion = check_accounted(one, path, seen, before)
        assert completion == 0
        ours = abandoned_lines(one, path, seen)[0]
        assert int(ours["prompt_tokens"]) > 0


def test_a_neuron_without_the_cancel_route_is_cut_as_before(scripted: Fleet) -> None:
    """The scripted stand-in answers 404 to the cancel: cortex closes the connection (the
    stand-in stops) and logs the request abandoned, with no tokens it could not know."""
    path = "/v1/chat/completions"
    body = {"model": "scripted/qwen", "messages": [{"role": "user", "content": "SLOW:5"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(scripted.base + path, json=body, timeout=0.5)
    log = scripted.cortex.log

    def line() -> dict[str, str] | None:
        return next(
            (x for x in access_lines(log()) if x["outcome"] == "abandoned" and x["path"] == path),
            None,
        )

    wait_for("the abandoned line", line)
    ours = line()
    assert ours is not None
    assert ours["status"] == "499" and ours["node"] == "scripted"
    assert "completion_tokens" not in ours
    assert any('msg="cancel failed"' in x and ours["request_id"] in x for x in log().splitlines())


def leave_mid_generation(base: str, path: str, body: dict, fleet: Fleet) -> None:
    """Send ``body`` over a raw connection, wait until tokens are being generated, hang up."""
    evaluated = tokens_evaluated(fleet)
    raw = json.dumps(body)
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(raw)}\r\n\r\n{raw}".encode())
        wait_for("tokens generated", lambda: tokens_evaluated(fleet) > evaluated + 30)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_the_neuron_itself_is_logged_with_the_tokens_made(
    one: Fleet, stream: bool
) -> None:
    """Straight to the neuron (no cortex, no cancel by id): it sees the client leave,
    stops the generation and waits for it, so its line has the exact count (the engine's)."""
    daemon, url = one.neurons["n"]
    path = "/v1/chat/completions"
    cancelled = re.compile(r'msg="generation cancelled" completion_tokens=(\d+)')

    def abandoned() -> list[dict[str, str]]:
        lines = [fields(x) for x in daemon.log().splitlines() if "msg=request" in x]
        return [x for x in lines if x["path"] == path and x["outcome"] == "abandoned"]

    seen = len(cancelled.findall(daemon.log()))
    before = len(abandoned())
    body = {"model": MODEL, "messages": MSGS, "max_tokens": LONG, "temperature": 0}
    leave_mid_generation(url, path, body | {"stream": stream}, one)

    def line() -> dict[str, str] | None:
        """This request's line: a new abandoned one, once its cancellation was logged (the
        access line comes after it, so an earlier request's line is never taken)."""
        left = abandoned()
        done = len(left) > before and len(cancelled.findall(daemon.log())) > seen
        return left[before] if done else None

    wait_for("the neuron's line", line)
    ours = line()
    assert ours is not None and ours["status"] == "499" and "request_id" not in ours
    assert int(ours["completion_tokens"]) > 0
    assert ours["completion_tokens"] == cancelled.findall(daemon.log())[-1]
