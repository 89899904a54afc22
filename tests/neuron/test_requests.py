"""Cancelling a request by id, and the token accounting of requests cut short: the
registry, the queue's withdraw, a stream's settled end, the access log's outcome; then the
cancel route on a real (in-process) neuron, streamed and not."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from helexa.neuron.access import Accounting, outcome
from helexa.neuron.admission import Admission, Withdrawn
from helexa.neuron.harness.base import Finish, TokenStream
from helexa.neuron.requests import Requests, Running, request_id_of
from helexa.neuron.service import Neuron
from helexa.up.tiny_model import TINY_REPO_ID
from tests.support.inprocess import run_neuron, sse_frames

# --- decisions --------------------------------------------------------------------------------


def test_outcome_says_abandoned_before_anything_else() -> None:
    assert outcome(200, Accounting()) == "ok"
    assert outcome(404, Accounting()) == "error"
    assert outcome(200, Accounting(error="shutting_down")) == "error"  # a stream that broke
    assert outcome(200, Accounting(abandoned=True)) == "abandoned"
    assert outcome(499, Accounting(abandoned=True, error="x")) == "abandoned"


def test_request_ids_are_short_plain_tokens() -> None:
    assert request_id_of("9f" * 16) == "9f" * 16
    assert request_id_of("a-b_C9") == "a-b_C9"
    for bad in (None, "", "a/b", "a b", "x" * 129, "../x", "id\n"):
        assert request_id_of(bad) is None


class FakeStream:
    def __init__(self) -> None:
        self.cancels = 0
        self.finish: Finish | None = None

    def cancel(self) -> None:
        self.cancels += 1


def test_the_registry_cancels_what_runs_and_forgets_what_ended() -> None:
    requests = Requests()
    first = requests.open("r1", Accounting())
    assert first.request_id == "r1" and len(requests) == 1
    # A second request with the same id is accounted for but not cancellable by it.
    twin = requests.open("r1", Accounting())
    anonymous = requests.open(None, Accounting())
    assert len(requests) == 1
    stream = FakeStream()
    first.started(stream)  # type: ignore[arg-type]
    assert requests.cancel("r1") and stream.cancels == 1
    assert first.record.abandoned and first.cancelled
    twin.end()
    anonymous.end()
    assert requests.cancel("r1")  # the twin's end did not remove the first
    first.end()
    first.end()  # idempotent
    assert not requests.cancel("r1") and len(requests) == 0
    assert not requests.cancel("nobody")


def test_a_cancel_before_the_start_stops_it_as_it_starts_or_leaves_the_queue() -> None:
    early = Running(Accounting())
    early.cancel()
    stream = FakeStream()
    early.started(stream)  # type: ignore[arg-type]
    assert stream.cancels == 1

    withdrawn: list[bool] = []
    queued = Running(Accounting())
    queued.queued(lambda: withdrawn.append(True))
    queued.cancel()
    assert withdrawn == [True]
    late = Running(Accounting())
    late.cancel()
    late.queued(lambda: withdrawn.append(True))
    assert withdrawn == [True, True]
    late.left()
    assert late.record.abandoned


def test_a_withdrawn_place_leaves_the_queue_and_its_wait_says_so() -> None:
    async def scenario() -> None:
        gate = Admission(max_concurrent=1, max_queue=2, timeout_s=30, retry_after_s=1)
        assert gate.join() is None  # the only slot
        place = gate.join()
        other = gate.join()
        assert place is not None and other is not None and gate.queued == 2
        waiting = asyncio.ensure_future(gate.wait(place))
        await asyncio.sleep(0)
        assert gate.withdraw(place)
        with pytest.raises(Withdrawn):
            await waiting
        with pytest.raises(Withdrawn):  # asked again: still withdrawn, never admitted
            await gate.wait(place, 0.01)
        assert not gate.withdraw(place)
        gate.leave(place)  # a no-op now
        assert gate.queued == 1
        gate.release()  # the slot passes to the other one, not to the withdrawn place
        assert await gate.wait(other)
        assert not gate.withdraw(other)  # admitted: nothing to withdraw
        assert gate.in_flight == 1

    asyncio.run(scenario())


def test_a_settled_stream_says_how_many_tokens_its_cancelled_generation_made() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        stream = TokenStream(loop)
        future: Future[Finish] = Future()
        stream.attach(future, lambda: None)
        stream.emit("a")
        assert await stream.settled(0.01) is None  # still running
        ended = Finish(reason="cancelled", prompt_tokens=3, completion_tokens=7)
        loop.call_later(0.02, future.set_result, ended)
        assert await stream.settled(5) == ended

        failed = TokenStream(loop)
        broken: Future[Finish] = Future()
        failed.attach(broken, lambda: None)
        broken.set_exception(RuntimeError("device lost"))
        assert await failed.settled(5) is None

    asyncio.run(scenario())


# --- the cancel route on a real neuron ----------------------------------------------------------

SETTINGS: dict[str, Any] = {"host": "127.0.0.1", "harnesses": [{"name": "transformers"}]}
CHAT = {
    "model": TINY_REPO_ID,
    "max_tokens": 1900,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Tell me about the weather in the city."}],
}


async def cancel_once_running(client: httpx.AsyncClient, request_id: str) -> None:
    """Cancel ``request_id`` as soon as the neuron knows it (404 until then)."""
    for _ in range(2000):
        answer = await client.post(f"/v1/requests/{request_id}/cancel")
        if answer.status_code == 204:
            return
        assert answer.json()["error"]["code"] == "request_not_found"
        await asyncio.sleep(0.005)
    raise AssertionError("the request never ran")


def access_records(caplog: pytest.LogCaptureFixture, path: str) -> list[Any]:
    return [r for r in caplog.records if r.name == "helexa.neuron.access" and r.path == path]  # type: ignore[attr-defined]


@pytest.mark.parametrize("stream", [True, False])
def test_a_request_cancelled_by_id_ends_as_usual_with_its_usage(
    hf_cache: Path, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    answers: list[httpx.Response] = []

    async def scenario(_neuron: Neuron, client: httpx.AsyncClient) -> None:
        body = CHAT | (
            {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        )
        asking = asyncio.ensure_future(
            client.post("/v1/chat/completions", json=body, headers={"x-helexa-request-id": "req-1"})
        )
        await cancel_once_running(client, "req-1")
        answers.append(await asking)
        gone = await client.post("/v1/requests/req-1/cancel")  # its answer is over
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "request_not_found"

    caplog.set_level(logging.INFO, logger="helexa.neuron.access")
    run_neuron(
        SETTINGS | {"harness": {"transformers": {"hf_cache": str(hf_cache)}}},
        TINY_REPO_ID,
        scenario,
    )
    (answer,) = answers
    assert answer.status_code == 200
    if stream:
        frames = sse_frames(answer.text)
        assert frames[-1] == "[DONE]"
        usage = orjson.loads(frames[-2])["usage"]
        assert orjson.loads(frames[-3])["choices"][0]["finish_reason"] == "stop"
    else:
        usage = answer.json()["usage"]
        assert answer.json()["choices"][0]["finish_reason"] == "stop"
    assert usage["completion_tokens"] < 1900
    (line,) = access_records(caplog, "/v1/chat/completions")
    assert (line.status, line.outcome, line.request_id) == (499, "abandoned", "req-1")
    assert line.completion_tokens == usage["completion_tokens"]
    assert line.prompt_tokens == usage["prompt_tokens"]
    cancels = access_records(caplog, "/v1/requests/req-1/cancel")
    assert [r.status for r in cancels][-2:] == [204, 404]
