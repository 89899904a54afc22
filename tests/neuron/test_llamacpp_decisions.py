"""The llama.cpp engine's decisions and sizing, as pure functions: slots and prefix reuse,
what goes in a step, what gives way when the KV cache is full, KV bytes, GPU placement."""

from __future__ import annotations

import pytest

from helexa.core.errors import ApiError
from helexa.core.wire import ModelSpec, default_harness
from helexa.neuron.harness.llamacpp.plan import (
    context_tokens,
    kv_bytes,
    place,
    split_by_room,
)
from helexa.neuron.harness.slots import (
    Chunk,
    ParkedView,
    SlotView,
    choose_slot,
    common_prefix,
    make_room,
    plan_parking,
    plan_step,
    to_park,
)
from helexa.neuron.model_files import select_gguf

GB = 1024**3


def slot(index: int, cached: list[int], *, busy: bool = False, used: int = 0, admitted: int = 0):
    return SlotView(index=index, cached=cached, busy=busy, last_used=used, admitted=admitted)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_next_turn_reuses_its_own_slot() -> None:
    first_turn = [1, 2, 3, 4, 5]  # prompt and answer, cached when the turn ended
    slots = [slot(0, [9, 9], used=5), slot(1, first_turn, used=1), slot(2, [], used=0)]
    choice = choose_slot([*first_turn, 6, 7], slots)
    assert choice is not None and (choice.slot, choice.reuse, choice.copy_from) == (1, 5, None)


def test_a_parked_conversation_is_restored_when_it_goes_on() -> None:
    first_turn = [1, 2, 3, 4, 5]
    slots = [slot(0, [1, 2], used=5), slot(1, [], used=0), slot(2, [7], busy=True)]
    parked = [ParkedView(key=9, cached=first_turn, last_used=3), ParkedView(8, [1, 2, 3], 4)]
    choice = choose_slot([*first_turn, 6], slots, parked)
    # The parked cache holds more than any slot: it goes into the slot that loses least.
    assert choice is not None and (choice.slot, choice.reuse, choice.restore) == (1, 5, 9)
    # A slot that holds as much wins: no restore.
    slots[0] = slot(0, first_turn, used=5)
    choice = choose_slot([*first_turn, 6], slots, parked)
    assert choice is not None and (choice.slot, choice.restore) == (0, None)
    # Nothing in common: an empty slot, nothing restored.
    choice = choose_slot([40, 41], slots, parked)
    assert choice is not None and choice.restore is None and choice.reuse == 0


def test_idle_caches_are_parked_only_while_something_runs() -> None:
    idle = [slot(0, [1, 2], used=1), slot(1, [], used=2), slot(2, [3], used=3)]
    assert to_park(idle) == []  # nothing runs: nothing slows down
    running = [*idle, slot(3, [4, 5], busy=True)]
    assert to_park(running) == [0, 2]  # empty slots have nothing to park


def test_host_memory_keeps_the_most_recently_used_caches() -> None:
    parked = [(1, 400, 5), (2, 300, 1)]  # (key, bytes, last used)
    idle = [(0, 300, 9), (3, 500, 2)]  # (slot, bytes, last used)
    assert plan_parking(idle, parked, 10_000) == ([0, 3], [])
    # 900 bytes: slot 0 (used at 9) and key 1 (5) fit; slot 3 (2) stays in the KV and
    # key 2 (1) goes; with 1000, key 2 still fits beside them.
    assert plan_parking(idle, parked, 900) == ([0], [2])
    assert plan_parking(idle, parked, 1000) == ([0], [])
    assert plan_parking(idle, parked, 0) == ([], [1, 2])
    assert plan_parking([(0, 2000, 9)], [], 1000) == ([], [])  # too big: left in the cache


def test_the_last_prompt_token_is_always_evaluated() -> None:
    choice = choose_slot([1, 2, 3], [slot(0, [1, 2, 3, 4])])
    assert choice is not None and choice.reuse == 2


def test_a_cold_prompt_takes_the_least_recently_used_free_slot() -> None:
    slots = [slot(0, [5], used=7), slot(1, [6], used=2), slot(2, [7], used=4, busy=True)]
    choice = choose_slot([1, 2], slots)
    assert choice is not None and (choice.slot, choice.reuse) == (1, 0)


def test_a_prefix_held_by_a_busy_slot_is_shared_into_a_free_one() -> None:
    system = [1, 2, 3, 4, 5, 6]
    slots = [slot(0, [*system, 8], busy=True), slot(1, [9], used=3), slot(2, [], used=1)]
    choice = choose_slot([*system, 7], slots)
    assert choice is not None
    assert (choice.slot, choice.reuse, choice.copy_from) == (2, 6, 0)


def test_another_conversation_on_the_same_system_prompt_keeps_the_first_cache() -> None:
    system = [1, 2, 3, 4]
    conversation_a = [*system, 10, 11, 12]
    slots = [slot(0, conversation_a, used=5), slot(1, [], used=0), slot(2, [7], used=1)]
    choice = choose_slot([*system, 20, 21], slots)
    assert choice is not None
    assert (choice.slot, choice.reuse, choice.copy_from) == (1, 4, 0)


def test_no_free_slot_means_wait() -> None:
    assert choose_slot([1], [slot(0, [], busy=True)]) is None


def test_a_step_decodes_every_running_sequence_then_fills_with_prompt_chunks() -> None:
    chunks = plan_step([0, 1], [(2, 700), (3, 50)], budget=512)
    assert chunks == [Chunk(0, 1), Chunk(1, 1), Chunk(2, 510)]
    assert plan_step([], [(2, 100), (3, 50)], budget=512) == [Chunk(2, 100), Chunk(3, 50)]


def test_room_comes_from_idle_caches_first_then_the_youngest_sequence() -> None:
    slots = [
        slot(0, [1] * 10, busy=True, admitted=1),
        slot(1, [2] * 10, used=9),
        slot(2, [3] * 10, used=4),
        slot(3, [4] * 10, busy=True, admitted=5),
    ]
    room = make_room(slots, frozenset({0, 3}))
    assert room is not None and (room.slot, room.preempt) == (2, False)
    running = [s for s in slots if s.busy]
    room = make_room(running, frozenset({0, 3}))
    assert room is not None and (room.slot, room.preempt) == (3, True)
    assert make_room([slots[0]], frozenset({0})) is None


def test_gguf_specs_default_to_llamacpp() -> None:
    assert default_harness("Qwen/Qwen3-8B", "Q4_K_M") == "llamacpp"
    assert default_harness("Qwen/Qwen3-0.6B-GGUF", None) == "llamacpp"
    assert default_harness("local/model-Q8_0.gguf", None) == "llamacpp"
    assert default_harness("Qwen/Qwen3-8B", None) == "transformers"
    assert ModelSpec(model_id="a/b", quant="Q8_0").harness == "llamacpp"
    assert ModelSpec(model_id="a/b", quant="Q8_0", harness="transformers").harness == (
        "transformers"
    )


def test_split_gguf_parts_load_from_the_first() -> None:
    files = [
        "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf",
        "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf",
        "m-Q8_0.gguf",
    ]
    assert select_gguf(files, "Q4_K_M") == "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"


def test_kv_bytes_and_context() -> None:
    # Qwen3-8B: 36 layers, 8 KV heads of 128: 144 KiB per token in f16.
    assert kv_bytes(1, n_layer=36, n_head_kv=8, head_k=128, head_v=128) == 147456
    assert context_tokens(40960, None, 32768) == 32768
    assert context_tokens(2048, None, 32768) == 2048
    assert context_tokens(131072, 65536, 32768) == 65536
    assert context_tokens(2048, 65536, 32768) == 2048  # never past training


def test_cpu_and_single_gpu_placement() -> None:
    cpu = place(devices=[], tensor_parallel=None, cuda_indices=[0], room={"cpu": GB}, need=GB // 2)
    assert cpu.on_cpu and cpu.share == (GB // 2,)
    best = place(
        devices=None,
        tensor_parallel=None,
        cuda_indices=[0, 1],
        room={"cpu": 0, "cuda:0": 4 * GB, "cuda:1": 20 * GB},
        need=10 * GB,
    )
    assert best.keys == ("cuda:1",) and best.tensor_split == ()
    with pytest.raises(ApiError) as full:
        place(devices=[0], tensor_parallel=None, cuda_indices=[0], room={"cuda:0": GB}, need=GB * 2)
    assert full.value.status == 409 and full.value.code == "insufficient_memory"


def test_multi_gpu_split_follows_free_memory() -> None:
    room = {"cuda:0": 22 * GB, "cuda:1": 10 * GB, "cuda:2": 4 * GB}
    split = place(
        devices=[0, 1], tensor_parallel=None, cuda_indices=[0, 1, 2], room=room, need=24 * GB
    )
    assert split.keys == ("cuda:0", "cuda:1")
    assert split.tensor_split == pytest.approx((22 / 32, 10 / 32))
    assert sum(split.share) == pytest.approx(24 * GB, rel=1e-6)
    widest = place(devices=None, tensor_parallel=2, cuda_indices=[0, 1, 2], room=room, need=GB)
    assert widest.keys == ("cuda:0", "cuda:1")
    assert split_by_room([2], {2: 5}) == (0.0, 0.0, 1.0)
    with pytest.raises(ApiError) as short:
        place(devices=[1, 2], tensor_parallel=None, cuda_indices=[0, 1, 2], room=room, need=20 * GB)
    assert short.value.status == 409
    with pytest.raises(ApiError) as missing:
        place(devices=[0, 7], tensor_parallel=None, cuda_indices=[0, 1], room=room, need=GB)
    assert missing.value.status == 400 and missing.value.param == "devices"
