"""The transformers harness's placement decisions (``harness/transformers/plan.py``), without I/O:
which devices a load spec allows, which one holds the model, and why none can."""

from __future__ import annotations

import pytest

from helexa.core.errors import ApiError
from helexa.neuron.devices import CPU, candidates
from helexa.neuron.harness.transformers import plan

MB = plan.MB


@pytest.mark.parametrize(
    ("devices", "cuda", "expected"),
    [
        (None, [], [CPU]),  # no GPU: the CPU
        (None, [0, 1], ["cuda:0", "cuda:1"]),  # unset: every GPU
        ([], [0, 1], [CPU]),  # devices: [] is the CPU, GPUs or not
        ([1], [0, 1], ["cuda:1"]),
    ],
)
def test_candidates(devices: list[int] | None, cuda: list[int], expected: list[str]) -> None:
    assert candidates(devices, None, cuda) == expected


@pytest.mark.parametrize(
    ("devices", "tensor_parallel", "code"),
    [
        ([0, 1], None, "unsupported_placement"),
        (None, 2, "unsupported_placement"),
        ([3], None, "no_such_device"),
    ],
)
def test_candidates_refused(
    devices: list[int] | None, tensor_parallel: int | None, code: str
) -> None:
    with pytest.raises(ApiError) as info:
        candidates(devices, tensor_parallel, [0, 1])
    assert info.value.status == 400 and info.value.code == code


def test_poisoned_devices_are_passed_over_and_none_left_is_a_503() -> None:
    assert plan.healthy(["cuda:0", "cuda:1"], ["cuda:0"]) == ["cuda:1"]
    with pytest.raises(ApiError) as info:
        plan.healthy(["cuda:0"], ["cuda:0"])
    assert info.value.status == 503 and info.value.code == "device_poisoned"


def test_the_device_with_most_room_wins_first_of_equals() -> None:
    assert plan.best_device(["cuda:0", "cuda:1"], {"cuda:0": 5 * MB, "cuda:1": 9 * MB}) == "cuda:1"
    assert plan.best_device(["cuda:0", "cuda:1"], {"cuda:0": 9 * MB, "cuda:1": 9 * MB}) == "cuda:0"


def test_refusal_says_never_or_not_now() -> None:
    room = {"cuda:0": 1 * MB, "cuda:1": 2 * MB}
    capacity = {"cuda:0": 24_000 * MB, "cuda:1": 12_000 * MB}
    busy = plan.refusal(10_000 * MB, "cuda:1", room, capacity)
    assert busy.status == 409 and busy.code == "insufficient_memory"
    assert "(cuda:1) has 2 MB free" in busy.message
    never = plan.refusal(30_000 * MB, "cuda:1", room, capacity)
    assert never.status == 400 and never.code == "model_too_large" and "cuda:0" in never.message
