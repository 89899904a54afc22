"""Device worker threads: job queue, futures, round-robin steps, poisoning (§1.3)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from helexa.neuron.device_thread import (
    DeviceWorker,
    NanLogitsFlood,
    WorkerPoisoned,
    is_device_fault,
)

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


@pytest.fixture
def worker():  # type: ignore[no-untyped-def]
    w = DeviceWorker("cuda-dev-0")
    w.start()
    yield w
    w.stop()


class Counter:
    """A stepped job that records which thread ran it and interleaving order."""

    def __init__(self, name: str, steps: int, log: list[str]) -> None:
        self.name, self.left, self.log = name, steps, log
        self.threads: set[str] = set()

    def step(self) -> bool:
        self.threads.add(threading.current_thread().name)
        self.log.append(self.name)
        self.left -= 1
        return self.left == 0

    def result(self) -> str:
        return self.name


def test_jobs_run_on_the_named_device_thread(worker: DeviceWorker) -> None:
    assert worker.submit(lambda: threading.current_thread().name).result(5) == "cuda-dev-0"
    assert worker.submit(lambda a, b: a + b, 2, 3).result(5) == 5


def test_stepped_jobs_interleave_round_robin(worker: DeviceWorker) -> None:
    gate = threading.Event()
    worker.submit(gate.wait)  # hold the thread so both jobs are queued before the first step
    log: list[str] = []
    a, b = Counter("a", 3, log), Counter("b", 3, log)
    fa, fb = worker.submit_stepped(a), worker.submit_stepped(b)
    gate.set()
    assert (fa.result(5), fb.result(5)) == ("a", "b")
    assert log == ["a", "b", "a", "b", "a", "b"]
    assert a.threads == b.threads == {"cuda-dev-0"}


def test_ordinary_errors_do_not_poison(worker: DeviceWorker) -> None:
    def boom() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        worker.submit(boom).result(5)
    oom = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError):
        worker.submit(lambda: (_ for _ in ()).throw(oom)).result(5)
    assert worker.poisoned is None
    assert worker.submit(lambda: 1).result(5) == 1


def test_device_fault_poisons_worker_and_rejects_everything_after(worker: DeviceWorker) -> None:
    gate = threading.Event()
    worker.submit(gate.wait)

    def fault() -> None:
        raise RuntimeError(CUDA_FAULT)

    failing = worker.submit(fault)
    queued: list[Future[int]] = [worker.submit(lambda: 1) for _ in range(3)]
    gate.set()
    with pytest.raises(WorkerPoisoned, match="cuda-dev-0 worker is poisoned"):
        failing.result(5)
    for future in queued:
        with pytest.raises(WorkerPoisoned):
            future.result(5)
    assert worker.poisoned and "illegal memory access" in worker.poisoned
    started = time.monotonic()
    later = worker.submit(lambda: 1)
    assert later.done()  # rejected at once, never queued
    with pytest.raises(WorkerPoisoned, match="poisoned"):
        later.result(0)
    assert time.monotonic() - started < 1


def test_nan_flood_in_a_step_poisons(worker: DeviceWorker) -> None:
    class NanJob:
        def step(self) -> bool:
            raise NanLogitsFlood("model produced NaN logits")

        def result(self) -> None:
            return None

    with pytest.raises(WorkerPoisoned):
        worker.submit_stepped(NanJob()).result(5)
    assert worker.poisoned is not None


def test_other_workers_keep_serving() -> None:
    sick, healthy = DeviceWorker("cuda-dev-0"), DeviceWorker("cuda-dev-1")
    sick.start()
    healthy.start()
    try:
        with pytest.raises(WorkerPoisoned):
            sick.submit(lambda: (_ for _ in ()).throw(RuntimeError(CUDA_FAULT))).result(5)
        assert healthy.submit(lambda: "ok").result(5) == "ok"
        assert healthy.poisoned is None
    finally:
        sick.stop()
        healthy.stop()


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), True),
        (NanLogitsFlood("nan"), True),
        (RuntimeError("CUDA out of memory"), False),
        (ValueError("shape mismatch"), False),
    ],
)
def test_fault_classification(error: BaseException, fault: bool) -> None:
    assert is_device_fault(error) is fault
