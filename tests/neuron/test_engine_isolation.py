"""The batched engine keeps one request's failure to that request: its sampler, its stop
matcher or its stream raising fails it alone while the rest of the batch (and the next
requests) carry on; a step-wide failure ends only the job it happened in (a request that
arrives just after starts a fresh job instead of inheriting the old error). Engine-level
tests run a fake backend on a real device worker; the end-to-end one runs the tiny model
in process with an injected sampler fault."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import torch

from helexa.neuron.detokenize import StopMatcher
from helexa.neuron.device_thread import DeviceWorker
from helexa.neuron.harness.base import Finish
from helexa.neuron.harness.engine import Engine, Generation, StepChunk
from helexa.neuron.harness.transformers.batched import TorchBackend
from helexa.neuron.sampling import SamplingParams
from helexa.neuron.service import Neuron
from tests.conftest import LOCAL_MODEL
from tests.support.inprocess import run_neuron, sse_frames

TIMEOUT = 30


class Letters:
    """A tokenizer whose token n is one letter."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


class FakeBackend:
    """Every request samples its seed as its token; the sets pick whose sampling raises."""

    def __init__(self) -> None:
        self.sample_fails: set[int] = set()  # seeds whose sampling raises
        self.start_fails: set[int] = set()  # seeds whose sampler cannot be set up
        self.decode_error: BaseException | None = None

    def forget(self, slot: int, start: int = 0) -> None:
        pass

    def share(self, src: int, dst: int, length: int) -> None:
        pass

    def clear(self) -> None:
        pass

    def start(self, generation: Generation) -> None:
        if generation.params.seed in self.start_fails:
            raise ValueError("no sampler for you")
        generation.state = object()

    def stop(self, generation: Generation) -> None:
        pass

    def decode(self, chunks: Sequence[StepChunk]) -> bool:
        if self.decode_error is not None:
            raise self.decode_error
        return True

    def sample(self, generations: Sequence[Generation]) -> list[int | BaseException | None]:
        return [
            ValueError("sampler broke") if g.params.seed in self.sample_fails else g.params.seed
            for g in generations
        ]

    def complete(self, generation: Generation) -> bool:
        return False

    def free_tokens(self) -> int | None:
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def worker() -> Iterator[DeviceWorker]:
    worker = DeviceWorker("test-dev")
    worker.start()
    yield worker
    worker.stop()


def request(seed: int, *, tokens: int = 6, stop: tuple[str, ...] = ()) -> Generation:
    texts: list[str] = []
    generation = Generation(
        prompt_ids=[1, 2, 3],
        params=SamplingParams(temperature=1.0, seed=seed, max_new_tokens=tokens, stop=stop),
        tokenizer=Letters(),
        emit=texts.append,
    )
    generation.texts = texts  # type: ignore[attr-defined]
    return generation


def outcome(generation: Generation) -> Finish | BaseException:
    try:
        return generation.future.result(TIMEOUT)
    except Exception as exc:
        return exc


def engine_on(worker: DeviceWorker, backend: FakeBackend, slots: int = 4) -> Engine:
    return Engine(backend, worker, slots=slots, batch_tokens=64, is_loaded=lambda: True)


def test_one_requests_sampler_failure_fails_it_alone(worker: DeviceWorker) -> None:
    backend = FakeBackend()
    backend.sample_fails = {3}
    backend.start_fails = {4}
    engine = engine_on(worker, backend)
    batch = [request(seed) for seed in (1, 2, 3, 4)]
    for generation in batch:
        engine.submit(generation)
    results = [outcome(g) for g in batch]
    assert isinstance(results[2], ValueError) and "sampler broke" in str(results[2])
    assert isinstance(results[3], ValueError) and "no sampler" in str(results[3])
    for generation, result in zip(batch[:2], results[:2], strict=True):
        assert isinstance(result, Finish) and result.completion_tokens == 6
        expected = Letters().decode([generation.params.seed or 0] * 6)
        assert "".join(generation.texts) == expected  # type: ignore[attr-defined]
    after = request(5)
    engine.submit(after)
    assert isinstance(outcome(after), Finish)  # the engine still serves
    assert worker.poisoned is None


def test_one_requests_output_failure_fails_it_alone(
    worker: DeviceWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = StopMatcher.push

    def push(self: StopMatcher, text: str) -> str:
        if "zzz" in self._stops:
            raise RuntimeError("stop matcher broke")
        return original(self, text)

    monkeypatch.setattr(StopMatcher, "push", push)
    engine = engine_on(worker, FakeBackend())
    healthy, broken = request(1), request(2, stop=("zzz",))

    def emit_fails(_text: str) -> None:
        raise RuntimeError("the event loop is closed")

    gone = request(3)
    gone.emit = emit_fails
    for generation in (healthy, broken, gone):
        engine.submit(generation)
    assert isinstance(outcome(healthy), Finish)
    assert "stop matcher broke" in str(outcome(broken))
    assert "loop is closed" in str(outcome(gone))
    assert worker.poisoned is None


def test_a_step_failure_fails_that_job_and_not_the_next_request(worker: DeviceWorker) -> None:
    backend = FakeBackend()
    backend.decode_error = ValueError("forward pass broke")
    engine = engine_on(worker, backend)
    first = request(1)
    engine.submit(first)
    assert "forward pass broke" in str(outcome(first))
    backend.decode_error = None
    second = request(2)
    engine.submit(second)
    assert isinstance(outcome(second), Finish)


def test_a_late_job_end_does_not_touch_the_job_after_it() -> None:
    """The race between a failing step and submit: the step marks the engine idle, a new
    request starts a new job, and only then does the worker report the failed job. That
    report must neither fail the new request nor mark the engine idle under its job."""
    worker = DeviceWorker("never-started")  # jobs wait in its queue; the test steps by hand
    backend = FakeBackend()
    backend.decode_error = ValueError("forward pass broke")
    engine = engine_on(worker, backend)
    first = request(1)
    engine.submit(first)
    job_future, _job = worker._jobs.get_nowait()
    with pytest.raises(ValueError):
        engine.step()  # what the worker does; the step fails its requests...
    assert isinstance(outcome(first), ValueError)
    second = request(2)
    engine.submit(second)  # ...and a request arriving now starts a new job
    job_future.set_exception(ValueError("forward pass broke"))  # the worker reports late
    assert not second.future.done()
    assert engine._running
    backend.decode_error = None
    worker._jobs.get_nowait()  # the new job: stepped by hand below
    while not engine.step():
        pass
    assert isinstance(outcome(second), Finish)


def test_a_refused_job_fails_its_requests(worker: DeviceWorker) -> None:
    worker.poison(RuntimeError("CUDA error: an illegal memory access was encountered"))
    engine = engine_on(worker, FakeBackend())
    refused = request(1)
    engine.submit(refused)
    assert "poisoned" in str(outcome(refused))
    assert not engine._running


def test_a_worker_poisoned_under_running_requests_fails_them_all() -> None:
    """Another model's fault poisons the shared worker between two steps: requests already
    generating here end with that error (they hung before) and their slots are let go."""
    worker = DeviceWorker("stepped-by-hand")
    engine = engine_on(worker, FakeBackend())
    running = [request(seed, tokens=50) for seed in (1, 2)]
    for generation in running:
        engine.submit(generation)
    job_future, _job = worker._jobs.get_nowait()
    engine.step()  # both are in slots, mid-generation
    assert all(g.slot is not None for g in running)
    job_future.set_exception(RuntimeError("device poisoned by another model"))
    for generation in running:
        assert "poisoned by another model" in str(outcome(generation))
    assert all(slot.owner is None for slot in engine._slots) and not engine._running


# --- end to end: the tiny model, one request's sampler raising --------------------------------


def test_a_sampler_fault_ends_that_stream_only(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = TorchBackend._sample_row
    calls: dict[str, int] = {"n": 0}

    def sample_row(generation: Generation, logits: torch.Tensor, row: int, greedy: int) -> int:
        if generation.params.seed == 666:
            calls["n"] += 1
            if calls["n"] > 3:
                raise ValueError("constraint state corrupted")
        return original(generation, logits, row, greedy)

    def body(seed: int) -> dict:
        return {
            "model": LOCAL_MODEL,
            "messages": [{"role": "user", "content": f"question {seed}"}],
            "max_tokens": 30,
            "temperature": 0.9,
            "seed": seed,
            "stream": True,
        }

    def text_of(frames: list[str]) -> str:
        assert frames[-1] == "[DONE]", frames[-1]
        chunks = [json.loads(f) for f in frames[:-1]]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

    async def scenario(neuron: Neuron, client: httpx.AsyncClient) -> None:
        async def frames(seed: int) -> list[str]:
            return sse_frames((await client.post("/v1/chat/completions", json=body(seed))).text)

        alone = text_of(await frames(1))
        monkeypatch.setattr(TorchBackend, "_sample_row", staticmethod(sample_row))
        healthy, victim = await asyncio.gather(frames(1), frames(666))
        error = json.loads(victim[-1])["error"]
        assert error["code"] == "generation_failed" and "constraint state" in error["message"]
        assert text_of(healthy) == alone  # same batch: it carried on, token for token
        assert neuron.engines.pool.worker("cpu").poisoned is None
        assert text_of(await frames(1)) == alone

    settings = {"model_dirs": [model_dir], "harnesses": [{"name": "transformers"}]}
    run_neuron(settings, LOCAL_MODEL, scenario)
