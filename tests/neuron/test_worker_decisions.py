"""The worker supervisor's pure decisions and the protocol's error round trip, without I/O."""

from __future__ import annotations

import signal

import pytest

from helexa.core.errors import ApiError
from helexa.core.wire import ModelSpec
from helexa.neuron.device_thread import WorkerPoisoned
from helexa.neuron.harness.base import ModelGone
from helexa.neuron.worker import faults, recovery
from helexa.neuron.worker.parent import describe_exit
from helexa.neuron.worker.protocol import exception_of, failure_of, spec_for_worker


def test_load_order_cpu_named_gpu_or_every_gpu_by_free_memory() -> None:
    free = {"cuda:0": 1000, "cuda:1": 9000}
    assert recovery.load_order([], None, [0, 1], free) == ["cpu"]
    assert recovery.load_order([1], None, [0, 1], free) == ["cuda:1"]
    assert recovery.load_order(None, None, [0, 1], free) == ["cuda:1", "cuda:0"]
    assert recovery.load_order(None, None, [], {}) == ["cpu"]


@pytest.mark.parametrize(
    ("devices", "tensor_parallel", "code"),
    [
        ([0, 1], None, "unsupported_placement"),
        (None, 2, "unsupported_placement"),
        ([3], None, "no_such_device"),
    ],
)
def test_load_order_refuses_what_one_worker_cannot_hold(
    devices: list[int] | None, tensor_parallel: int | None, code: str
) -> None:
    with pytest.raises(ApiError) as caught:
        recovery.load_order(devices, tensor_parallel, [0, 1], {})
    assert caught.value.status == 400
    assert caught.value.code == code


def test_backoff_doubles_up_to_its_cap() -> None:
    waits = [recovery.backoff_s(n, base_s=0.5, cap_s=4) for n in range(1, 7)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_worker_that_ran_a_while_counts_its_crashes_anew() -> None:
    assert recovery.consecutive(3, uptime_s=5) == 4
    assert recovery.consecutive(3, uptime_s=recovery.STABLE_S) == 1


def test_models_that_crashed_their_worker_too_often_are_not_reloaded() -> None:
    again, given_up = recovery.to_reload(
        [
            recovery.Strikes("a", 1),
            recovery.Strikes("b", 3),
            recovery.Strikes("c", 4),
        ],
        max_restarts=3,
    )
    assert again == ["a", "b"]
    assert given_up == ["c"]
    assert "load it to retry" in recovery.gave_up("killed by SIGSEGV", 4)


def test_a_crash_counts_against_the_model_being_loaded_else_all_it_held() -> None:
    assert recovery.struck(["a", "b"], ["c"]) == ["c"]
    assert recovery.struck(["a", "b"], []) == ["a", "b"]


def test_exits_are_described_by_signal_or_status() -> None:
    assert (
        describe_exit("cpu", 7, -signal.SIGSEGV) == "the cpu worker (pid 7) was killed by SIGSEGV"
    )
    assert describe_exit("cuda:1", 8, 3) == "the cuda:1 worker (pid 8) exited with status 3"
    assert "stopped answering" in describe_exit("cpu", 9, None)


def test_errors_cross_the_process_boundary_with_their_type_and_envelope() -> None:
    api = ApiError(409, "full", code="insufficient_memory", param="model_id", headers={"A": "b"})
    back = exception_of(failure_of(api))
    assert isinstance(back, ApiError)
    assert (back.status, back.message, back.code, back.param, back.headers) == (
        409,
        "full",
        "insufficient_memory",
        "model_id",
        {"A": "b"},
    )
    assert isinstance(exception_of(failure_of(ModelGone("gone"))), ModelGone)
    assert isinstance(exception_of(failure_of(WorkerPoisoned("nan"))), WorkerPoisoned)
    other = exception_of(failure_of(KeyError("x")))
    assert isinstance(other, RuntimeError) and "KeyError" in str(other)


def test_a_worker_sees_its_own_device_only() -> None:
    spec = ModelSpec(model_id="m", devices=[3])
    assert spec_for_worker(spec, "cuda:3").devices == [0]
    assert spec_for_worker(ModelSpec(model_id="m"), "cpu").devices == []


def test_the_fault_hook_parses_only_what_it_documents() -> None:
    hook = faults.parse("load:crashy:SIGABRT")
    assert hook is not None and hook.match == "crashy" and hook.signal == signal.SIGABRT
    assert faults.parse("load:x:ILL").signal == signal.SIGILL  # type: ignore[union-attr]
    for bad in (None, "", "load::SIGSEGV", "step:x:SIGSEGV", "load:x:NOPE"):
        assert faults.parse(bad) is None
