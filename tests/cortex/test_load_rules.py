"""The load owner's and the router's pure decisions, without I/O: where a cold load goes,
what a load sends, how a neuron's refusal is answered, when to defrag, what a name means."""

from __future__ import annotations

from helexa.cortex import names
from helexa.cortex.catalogue import ModelProfile, parse_catalogue
from helexa.cortex.load_rules import (
    Unplaced,
    decide_placement,
    defrag_due,
    load_refused,
    neuron_error,
    spec_for,
)
from helexa.cortex.placement import CPU_POOL, Placement, PoolPlan
from tests.cortex.test_decisions import gpu, res, view

GGUF = ModelProfile(id="org/Big-GGUF", quant="Q4_K_M", min_devices=0)
DENSE = ModelProfile(id="org/dense", vram_mb=8000)


def test_a_model_that_fits_goes_to_one_neuron_evicting_an_idle_one() -> None:
    busy = view("a", [gpu(0, 24_000, 2_000)], residents=[res("old", 20_000, used=1.0)])
    decision = decide_placement(DENSE, [busy], [busy], 8_000, "lru", pool=True)
    assert decision == Placement(neuron="a", pool=0, evict=("old",))


def test_no_neuron_able_to_host_it_is_not_a_capacity_problem() -> None:
    cpu_only = view("c", cpu_free=99_000)
    assert decide_placement(DENSE, [cpu_only], [cpu_only], 8_000, "lru", pool=True) is (
        Unplaced.NO_HOST
    )
    down = view("g", [gpu(0, 24_000, 24_000)], healthy=False)
    assert decide_placement(DENSE, [down], [down], 8_000, "lru", pool=True) is Unplaced.NO_HOST


def test_a_pool_is_planned_only_when_asked_on_fresh_figures() -> None:
    views = [view("a", cpu_free=20_000), view("b", cpu_free=30_000)]
    assert decide_placement(GGUF, views, views, 42_000, "lru", pool=False) is Unplaced.NO_ROOM
    pooled = decide_placement(GGUF, views, views, 42_000, "lru", pool=True)
    assert isinstance(pooled, PoolPlan) and pooled.borrower.neuron == "b"
    # Too big for the whole fleet: no room, pooled or not.
    assert decide_placement(GGUF, views, views, 90_000, "lru", pool=True) is Unplaced.NO_ROOM


def test_the_spec_names_the_pool_planned_else_leaves_it_to_the_neuron() -> None:
    assert spec_for(DENSE, True) == {"model_id": "org/dense", "harness": "transformers"}
    assert spec_for(DENSE, True, 1)["devices"] == [1]
    assert spec_for(GGUF, True, CPU_POOL)["devices"] == []
    assert spec_for(GGUF, False) == {
        "model_id": "org/Big-GGUF",
        "harness": "llamacpp",
        "quant": "Q4_K_M",
        "devices": [],  # a CPU-capable model on a neuron without GPUs: its CPU budget
    }
    tensor_parallel = ModelProfile(id="org/tp", min_devices=2)
    assert "devices" not in spec_for(tensor_parallel, True, 0)  # the neuron picks its pair


def test_a_refused_load_is_passed_on_when_retrying_cannot_help() -> None:
    missing = load_refused("m", "n1", 404, {"message": "no such repo", "code": "weights"}, 5)
    assert (missing.status, missing.code, missing.headers) == (404, "weights", {})
    assert "loading 'm' on n1 failed: no such repo" in missing.message
    busy = load_refused("m", "n1", 503, {"message": "busy"}, 5)
    assert (busy.status, busy.code, busy.headers) == (503, "load_failed", {"Retry-After": "5"})
    downloading = load_refused(
        "m", "n1", 503, {"message": "downloading m: 34 %, ~2 min", "code": "downloading"}, 5
    )
    assert downloading.code == "downloading" and "34 %" in downloading.message
    assert downloading.headers == {"Retry-After": "5"}
    bare = load_refused("m", "n1", 500, {}, 5)
    assert "status 500" in bare.message and bare.status == 503


def test_an_admin_command_refused_keeps_the_neurons_words() -> None:
    error = neuron_error("n1", 409, {"message": "loaded", "code": "weights_in_use"}, "deleting")
    assert (error.status, error.code, error.message) == (
        409,
        "weights_in_use",
        "deleting on n1: loaded",
    )
    odd = neuron_error("n1", 200, {"param": 3}, "pulling 'm'")  # not an error status: a 502
    assert odd.status == 502 and odd.param is None and odd.code == "neuron_error"


def test_defrag_after_the_threshold_once_and_never_when_off() -> None:
    assert defrag_due(5, 5, running=False)
    assert not defrag_due(4, 5, running=False)
    assert not defrag_due(9, 5, running=True)  # one at a time per neuron
    assert not defrag_due(99, 0, running=False)  # 0: never


def test_names_resolve_through_aliases_served_models_and_fallbacks() -> None:
    catalogue = parse_catalogue(
        {
            "models": [{"id": "org/big"}],
            "aliases": {"default": "org/big"},
            "fallbacks": {"claude-*": "default"},
        },
        "models.toml",
    )
    served = {"local/extra"}.__contains__
    assert names.resolve(catalogue, "default", served) == "org/big"
    assert names.resolve(catalogue, "local/extra", served) == "local/extra"  # a neuron has it
    assert names.resolve(catalogue, "claude-sonnet-4", served) == "org/big"
    assert names.resolve(catalogue, "nothing", served) == "nothing"  # its 404 comes later
    assert names.granting(catalogue, "default", "org/big") == ["default"]
    assert names.granting(catalogue, "claude-sonnet-4", "org/big") == ["claude-*"]
    assert names.granting(catalogue, "org/big", "org/big") == ["org/big"]
