"""One OS thread per device, owning every piece of model work on it (§1.3); in a worker
process (``neuron.worker``), the thread of that process's device.

Jobs arrive on a queue and complete ``concurrent.futures.Future``s that the event
loop awaits. Long-running work (a generation) is a *stepped* job: each ``step()``
is one forward pass, after which the job goes to the back of the queue, so
concurrent generations and loads on one device interleave token by token.

A device fault (CUDA driver error, device-side assert, NaN-logits flood) poisons
the worker: the failing job and every job after it are rejected at once with
``WorkerPoisoned``. Other devices' workers are unaffected.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

log = logging.getLogger("helexa.neuron.device_thread")

T = TypeVar("T")

# Substrings of errors after which a CUDA context cannot be trusted again.
DEVICE_FAULT_MARKERS = (
    "cuda error",
    "illegal memory access",
    "device-side assert",
    "illegal instruction",
    "unspecified launch failure",
    "misaligned address",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "nccl error",
)


class WorkerPoisoned(RuntimeError):
    """The device's worker hit a fault earlier and accepts no more work."""


class NanLogitsFlood(RuntimeError):
    """The model produced non-finite logits: the device state is not trustworthy."""


def is_device_fault(exc: BaseException) -> bool:
    """True for errors that leave the device unusable (out-of-memory is not one)."""
    if isinstance(exc, NanLogitsFlood):
        return True
    text = str(exc).lower()
    if "out of memory" in text:
        return False
    return any(marker in text for marker in DEVICE_FAULT_MARKERS)


class SteppedJob(Protocol):
    def step(self) -> bool:
        """Advance one unit of work; True once finished."""
        ...

    def result(self) -> Any: ...


class _Stop:
    pass


_STOP = _Stop()


class DeviceWorker:
    """The thread that owns one device (``cuda-dev-N`` or ``cpu``)."""

    def __init__(
        self,
        name: str,
        *,
        on_start: Callable[[], None] | None = None,
        fault_detector: Callable[[BaseException], bool] = is_device_fault,
    ) -> None:
        self.name = name
        self._on_start = on_start
        self._is_fault = fault_detector
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._lock = threading.Lock()
        self.poisoned: str | None = None
        # Run on this thread after every job or step (a worker process sends the step's
        # output from here: one frame per engine step, no hop through an event loop).
        self.after_job: Callable[[], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the device thread."""
        future: Future[T] = Future()
        self._enqueue((future, lambda: fn(*args)))
        return future

    def submit_stepped(self, job: SteppedJob) -> Future[Any]:
        """Run ``job.step()`` repeatedly, round-robin with other jobs, until it finishes."""
        future: Future[Any] = Future()
        self._enqueue((future, job))
        return future

    def stop(self, timeout: float | None = 10.0) -> None:
        self._jobs.put(_STOP)
        if self._thread.is_alive() and threading.get_ident() != self._thread.ident:
            self._thread.join(timeout)

    # -- internals ---------------------------------------------------------------------------

    def _poisoned_error(self) -> WorkerPoisoned:
        return WorkerPoisoned(f"{self.name} worker is poisoned: {self.poisoned}")

    def _enqueue(self, item: tuple[Future[Any], Any]) -> None:
        with self._lock:
            if self.poisoned is not None:
                item[0].set_exception(self._poisoned_error())
                return
            self._jobs.put(item)

    def poison(self, exc: BaseException) -> None:
        """A fault found outside the worker's own jobs (a load on another thread)."""
        self._poison(exc)

    def _poison(self, exc: BaseException) -> None:
        with self._lock:
            first = self.poisoned is None
            if first:
                self.poisoned = f"{type(exc).__name__}: {exc}"
        if first:
            log.error("device worker poisoned", extra={"worker": self.name, "error": self.poisoned})
        # Reject everything already waiting, at once.
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._jobs.put(_STOP)
                break
            self._fail(item[0], self._poisoned_error())

    @staticmethod
    def _fail(future: Future[Any], exc: BaseException) -> None:
        if not future.done():
            future.set_exception(exc)

    def _run(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except BaseException as exc:  # the device cannot even be selected
                self._poison(exc)
        while True:
            item = self._jobs.get()
            if item is _STOP:
                return
            future, job = item
            if self.poisoned is not None:
                self._fail(future, self._poisoned_error())
                continue
            if future.done():  # cancelled by its owner while queued
                continue
            try:
                if callable(job):
                    future.set_result(job())
                elif job.step():
                    future.set_result(job.result())
                else:
                    self._jobs.put(item)
            except BaseException as exc:
                if self._is_fault(exc):
                    self._poison(exc)  # first, so whoever sees the failure sees the poison
                    self._fail(future, WorkerPoisoned(f"{self.name} worker is poisoned: {exc}"))
                else:
                    self._fail(future, exc)
            if self.after_job is not None:
                try:
                    self.after_job()
                except Exception:
                    log.exception("after-job hook failed", extra={"worker": self.name})
