"""Pooling's pure decisions, without I/O: cortex's plan (borrower and fewest donors), the
borrower's layer split, when a donor's loan is over, and whom its gate admits."""

from __future__ import annotations

import pytest

from helexa.core.errors import ApiError
from helexa.core.wire import LendRequest
from helexa.cortex.catalogue import ModelProfile
from helexa.cortex.placement import CPU_POOL, POOL_MARGIN, PoolPlan, Share, plan_pool
from helexa.neuron.config import NeuronSettings
from helexa.neuron.harness.llamacpp.plan import MB, pool_split
from helexa.neuron.lending import Activity, allowlist, lend_host, loan_over
from helexa.neuron.rpc_gate import admitted, normalized
from tests.cortex.test_decisions import gpu, view

GGUF = ModelProfile(id="org/Big-70B-GGUF", quant="Q4_K_M", min_devices=0)
GGUF_GPU = ModelProfile(id="org/Big-70B-GGUF", quant="Q4_K_M")  # GPUs only
DENSE = ModelProfile(id="org/Big-70B", min_devices=0)


def covers(plan: PoolPlan, need: int) -> bool:
    return plan.total_mb >= need * POOL_MARGIN


def test_no_pool_for_dense_models_or_when_the_fleet_is_too_small() -> None:
    views = [view("a", cpu_free=30_000), view("b", cpu_free=30_000)]
    assert plan_pool(DENSE, views, views, 42_000) is None
    assert plan_pool(GGUF, views, views, 70_000) is None  # 60 GB free in all


def test_the_fewest_donors_cover_the_rest() -> None:
    views = [
        view("a", cpu_free=20_000),
        view("b", cpu_free=12_000),
        view("c", cpu_free=30_000),
    ]
    plan = plan_pool(GGUF, views, views, 42_000)
    assert plan is not None and covers(plan, 42_000)
    assert len(plan.donors) == 1
    # The borrower with most room gives the most; the one donor that can cover the rest.
    assert plan.borrower == Share("c", CPU_POOL, 30_000)
    assert plan.donors[0].neuron == "a"


def test_gpus_are_preferred_to_cpu_budgets_and_the_borrower_runs_on_its_gpu() -> None:
    views = [
        view("box1", [gpu(0, 24_000, 23_000)], cpu_free=60_000),
        view("box2", [gpu(0, 12_000, 11_500), gpu(1, 12_000, 11_500)], cpu_free=60_000),
    ]
    plan = plan_pool(GGUF_GPU, views, views, 42_000)
    assert plan is not None and covers(plan, 42_000)
    assert plan.borrower.pool != CPU_POOL
    assert all(d.pool != CPU_POOL for d in plan.donors)
    hosts = {plan.borrower.neuron, *(d.neuron for d in plan.donors)}
    assert hosts == {"box1", "box2"}
    # A borrower's other GPU may lend to it (a split within one host, through RPC too).
    same_host = plan_pool(GGUF_GPU, views[1:], views[1:], 21_000)
    assert same_host is not None
    assert same_host.donors[0].neuron == "box2" and same_host.donors[0].pool != (
        same_host.borrower.pool
    )


def test_unhealthy_donors_and_excluded_borrowers_are_left_out() -> None:
    views = [view("a", cpu_free=30_000), view("b", cpu_free=30_000, healthy=False)]
    assert plan_pool(GGUF, views, views, 42_000) is None
    third = view("c", cpu_free=30_000)
    # "a" may not borrow (the model just failed there) but may still lend.
    plan = plan_pool(GGUF, [third], [*views, third], 42_000)
    assert plan is not None and plan.borrower.neuron == "c"
    assert [d.neuron for d in plan.donors] == ["a"]


def test_loads_in_flight_count_against_a_donors_free_memory() -> None:
    busy = view("a", cpu_free=30_000, pending={CPU_POOL: 25_000})
    plan = plan_pool(GGUF, [view("c", cpu_free=30_000)], [busy], 42_000)
    assert plan is None


@pytest.mark.parametrize("remote_mb", [[50], [40, 40], [10]])
def test_a_cpu_borrower_keeps_the_first_layers_and_splits_the_rest(remote_mb: list[int]) -> None:
    need = 150 * MB
    split = pool_split(n_layer=30, need=need, remote_mb=remote_mb, local_mb=None, local_gpu=False)
    assert 1 <= split.n_gpu_layers <= 31
    assert sum(split.tensor_split) == pytest.approx(1.0)
    assert len(split.tensor_split) == len(remote_mb)
    local_share = need - sum(remote_mb) * MB
    # Whole layers, and the output layer's weight kept here: within two layers' size of
    # what the remotes leave it.
    assert abs(split.local_bytes - local_share) <= 2 * need / 31 + 1
    assert split.n_gpu_layers >= len(remote_mb)  # every remote device gets a layer


def test_a_gpu_borrower_is_the_last_device_of_the_split() -> None:
    split = pool_split(
        n_layer=80, need=42_000 * MB, remote_mb=[10_000, 12_000], local_mb=20_000, local_gpu=True
    )
    assert split.n_gpu_layers == 81
    assert split.tensor_split == pytest.approx((10 / 42, 12 / 42, 20 / 42))
    assert split.local_bytes == 20_000 * MB


def test_a_loan_ends_when_its_borrower_is_gone_a_while_or_never_came() -> None:
    grace, connect = 10.0, 120.0

    def over(activity: Activity, now: float) -> str | None:
        return loan_over(activity, now, grace_s=grace, connect_s=connect)

    waiting = Activity(started=0.0)
    assert over(waiting, 119) is None
    assert "did not connect" in (over(waiting, 121) or "")
    serving = Activity(started=0.0, connections=1, ever_connected=True)
    assert over(serving, 10_000) is None
    # A load opens and closes connections: a short gap is not the borrower leaving.
    between = Activity(started=0.0, ever_connected=True, idle_since=100.0)
    assert over(between, 105) is None
    assert "disconnected" in (over(between, 111) or "")
    dead = Activity(started=0.0, connections=1, ever_connected=True, exited="signal 9")
    assert "ended" in (over(dead, 1) or "")


def test_the_gate_admits_only_the_addresses_named() -> None:
    assert admitted("10.0.0.2", ["10.0.0.2"])
    assert admitted("::ffff:10.0.0.2", ["10.0.0.2"])  # a dual-stack socket's spelling
    assert normalized("::ffff:127.0.0.1") == "127.0.0.1"
    assert not admitted("10.0.0.3", ["10.0.0.2"])
    assert not admitted("127.0.0.1", [])  # nobody named: nobody admitted


def test_a_loan_names_its_borrower_and_never_a_wildcard() -> None:
    request = LendRequest(mb=10, borrower="127.0.0.1", model_id="m-GGUF", allow=["10.1.1.1"])
    assert allowlist(request, "127.0.0.1") == ["10.1.1.1", "127.0.0.1"]
    with pytest.raises(ApiError, match="wildcard"):
        allowlist(request.model_copy(update={"allow": ["0.0.0.0"]}), "127.0.0.1")
    with pytest.raises(ApiError, match="not an IP"):
        allowlist(request.model_copy(update={"allow": ["10.1.1.0/24"]}), "127.0.0.1")
    with pytest.raises(ApiError, match="does not resolve"):
        allowlist(request.model_copy(update={"borrower": "no-such-host.invalid"}), "127.0.0.1")


def test_a_borrower_named_by_loopback_cannot_borrow_from_another_host() -> None:
    # cortex reaches the borrower at 127.0.0.1; a donor on 10.0.0.5 would admit itself.
    alone = LendRequest(mb=10, borrower="127.0.0.1", model_id="m-GGUF")
    with pytest.raises(ApiError) as caught:
        allowlist(alone, "10.0.0.5")
    assert caught.value.code == "borrower_unreachable" and caught.value.status == 409
    # cortex's plan never asks: a loopback borrower borrows from loopback neurons only.
    near = view("near", cpu_free=30_000, loopback=True)
    far = view("far", cpu_free=30_000)
    plan = plan_pool(GGUF, [near], [near, far], 42_000)
    assert plan is None
    plan = plan_pool(GGUF, [far], [near, far], 42_000)
    assert plan is not None and plan.donors[0].neuron == "near"  # the far one may borrow


def test_a_borrower_keeps_a_share_itself() -> None:
    full = view("full", cpu_free=100)  # too little to hold a layer of its own
    roomy = [view("a", cpu_free=25_000), view("b", cpu_free=25_000)]
    plan = plan_pool(GGUF, [full], [full, *roomy], 42_000)
    assert plan is None


def test_donors_listen_on_one_fleet_address_only() -> None:
    assert lend_host(NeuronSettings(host="10.0.0.5")) == "10.0.0.5"
    assert lend_host(NeuronSettings(host="0.0.0.0", rpc={"host": "10.0.0.5"})) == "10.0.0.5"
    for wildcard in ("0.0.0.0", "::", "0", "::0"):
        with pytest.raises(ApiError) as caught:
            lend_host(NeuronSettings(host=wildcard, token="t" * 32))
        assert caught.value.code == "lending_disabled"
        with pytest.raises(ApiError):
            lend_host(NeuronSettings(rpc={"host": wildcard}))
