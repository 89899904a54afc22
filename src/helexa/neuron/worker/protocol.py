"""The messages between the neuron and its device workers, defined once.

Transport: a ``multiprocessing.connection.Connection`` over a socket pair, one pickled
message per frame. Both ends are this package's own processes, so pickle's trust model
holds, and it was measured as fast as msgspec for these shapes (``bench/ipc_step.py``):
what a step costs is the frame's system calls, not the encoding. Output is batched: one
``Output`` carries every running generation's new text since the last one, not one frame
per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from helexa.core.errors import ApiError
from helexa.core.wire import BatchInfo, ModelSpec, ModelStatus, PrefixCacheInfo
from helexa.neuron.device_thread import WorkerPoisoned
from helexa.neuron.devices import CPU
from helexa.neuron.harness.base import Finish, ModelGone

# -- neuron -> worker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Init:
    """The first frame: what the worker serves and how."""

    settings: dict[str, Any]  # NeuronSettings, dumped (the loaded class is local)
    engines: tuple[str, ...]  # the harnesses to build (the neuron checked their libraries)
    device: str  # "cpu" or "cuda:N" (the worker sees that GPU as cuda:0)
    cpu_budget_bytes: int  # 0 on a GPU worker: it never places on the CPU


@dataclass(frozen=True)
class Call:
    """Run ``method(*args)`` on the worker's engine ``engine``; a ``Reply`` answers it.
    ``generate`` replies once the generation is submitted; its text comes in ``Output``s
    under the call's id."""

    id: int
    engine: str
    method: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Cancel:
    """Stop generation ``id`` before its next token."""

    id: int


@dataclass(frozen=True)
class Ping:
    """Are you there? Answered by a ``Pong`` from the worker's loop (not its device thread,
    which may be in a long forward pass)."""

    seq: int


@dataclass(frozen=True)
class Pong:
    seq: int


@dataclass(frozen=True)
class Shutdown:
    """Release everything and exit (the worker also exits when the neuron's end closes)."""


# -- worker -> neuron ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    pid: int
    engines: tuple[str, ...]
    startup_s: float  # from the interpreter's start to the first frame it can serve


@dataclass(frozen=True)
class Failure:
    """An exception raised on the worker, in a form that crosses processes whole."""

    kind: str  # "api" | "model_gone" | "poisoned" | "other"
    message: str
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    id: int
    value: Any = None
    error: Failure | None = None


@dataclass(frozen=True)
class Output:
    """What every generation produced since the last ``Output``: new text per id, and the
    ends (a ``Finish``, or the ``Failure`` the generation raised)."""

    pieces: dict[int, list[str]]
    ends: dict[int, Finish | Failure]


@dataclass(frozen=True)
class EngineView:
    """One engine's models on the worker, as the sync ``Harness`` queries report them."""

    models: list[ModelStatus]
    loading: dict[str, str]
    memory_bytes: int  # on the worker's device
    prefix: dict[str, PrefixCacheInfo | None]
    batch: dict[str, BatchInfo | None]


@dataclass(frozen=True)
class Snapshot:
    """The worker's state, sent after every load or unload and while it generates (at most
    a few times a second): the neuron's ``/health`` and ``/models`` read it, never the worker."""

    engines: dict[str, EngineView]
    poisoned: str | None = None


# -- errors across the boundary -----------------------------------------------------------------


def failure_of(exc: BaseException) -> Failure:
    if isinstance(exc, ApiError):
        return Failure(
            kind="api",
            message=exc.message,
            status=exc.status,
            type=exc.type,
            code=exc.code,
            param=exc.param,
            headers=dict(exc.headers),
            details=dict(exc.details),
        )
    if isinstance(exc, ModelGone):
        return Failure(kind="model_gone", message=str(exc))
    if isinstance(exc, WorkerPoisoned):
        return Failure(kind="poisoned", message=str(exc))
    return Failure(kind="other", message=f"{type(exc).__name__}: {exc}")


def exception_of(failure: Failure) -> BaseException:
    if failure.kind == "api":
        return ApiError(
            failure.status,
            failure.message,
            type=failure.type,
            code=failure.code,
            param=failure.param,
            headers=failure.headers,
            details=failure.details,
        )
    if failure.kind == "model_gone":
        return ModelGone(failure.message)
    if failure.kind == "poisoned":
        return WorkerPoisoned(failure.message)
    return RuntimeError(failure.message)


def spec_for_worker(spec: ModelSpec, device: str) -> ModelSpec:
    """``spec`` as the worker of ``device`` sees it: the CPU is ``devices: []``, a GPU is the
    only one it has (``[0]``)."""
    return spec.model_copy(update={"devices": [] if device == CPU else [0]})
