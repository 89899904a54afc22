"""The router and the fleet's per-neuron state, in process, with the neurons' answers
scripted: regressions from a code read of cortex (each names what it guards)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest

from helexa.core.errors import ApiError
from helexa.core.wire import (
    Discovery,
    DownloadInfo,
    Health,
    LendRequest,
    Loan,
    ModelSize,
    ModelStatus,
    StoredModel,
)
from helexa.cortex.catalogue import parse_catalogue
from helexa.cortex.config import CortexSettings, NeuronEntry
from helexa.cortex.fleet import Fleet, NeuronState, view_of
from helexa.cortex.loads import Loads
from helexa.cortex.metrics import Metrics
from helexa.cortex.neuron_client import LoadReply
from helexa.cortex.placement import plan_eviction
from helexa.cortex.router import Router
from tests.support.wire import discovery_body, health_body


def discovery(name: str, gpus_mb: list[int]) -> Discovery:
    return Discovery.model_validate(discovery_body(gpus_mb, hostname=name))


def health(
    gpus_free_mb: list[int], models: dict[str, tuple[int, int]] | None = None, cpu_free: int = 0
) -> Health:
    return Health.model_validate(health_body(gpus_free_mb, models, cpu_free_mb=cpu_free))


def status(model_id: str, state: str = "loaded", devices: list[int] | None = None) -> ModelStatus:
    return ModelStatus(
        id=model_id,
        harness="transformers",
        status=state,  # type: ignore[arg-type]
        devices=devices if devices is not None else [0],
        vram_used_mb=1000,
        context_length=4096,
    )


class ScriptedClient:
    """The neurons' lifecycle API, scripted: each call is recorded as the route it stands
    for; ``hold[(neuron, route)]`` holds a call until set."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str, dict[str, Any]]] = []
        self.hold: dict[tuple[str, str], asyncio.Event] = {}
        self.canonical: dict[str, str] = {}  # model id -> the id the neuron reports instead

    async def _called(self, state: NeuronState, path: str, body: dict[str, Any]) -> None:
        self.posts.append((state.name, path, body))
        gate = self.hold.get((state.name, path))
        if gate is not None:
            await gate.wait()

    async def load(self, state: NeuronState, spec: dict[str, Any]) -> LoadReply:
        await self._called(state, "/models/load", spec)
        model_id = self.canonical.get(spec["model_id"], spec["model_id"])
        devices = spec.get("devices")
        return LoadReply("loaded", status(model_id, devices=[0] if devices is None else devices))

    async def unload(self, state: NeuronState, model_id: str) -> None:
        await self._called(state, "/models/unload", {"model_id": model_id})

    async def size(self, state: NeuronState, spec: dict[str, Any]) -> ModelSize:
        raise AssertionError("sized: give the test models vram_mb")

    async def recycle(self, state: NeuronState) -> list[str]:
        await self._called(state, "/workers/recycle", {})
        return ["cuda:0"]

    async def lend(self, state: NeuronState, request: LendRequest) -> Loan:
        raise AssertionError("no pooled loads here")

    async def release(self, state: NeuronState, loan_id: str) -> None:
        await self._called(state, "/rpc/release", {"loan_id": loan_id})

    async def pull(self, state: NeuronState, spec: dict[str, Any]) -> DownloadInfo:
        await self._called(state, "/models/pull", spec)
        return DownloadInfo(model_id=str(spec["model_id"]), state="downloading")

    async def delete(self, state: NeuronState, model_id: str) -> int:
        await self._called(state, "/models/delete", {"model_id": model_id})
        return 0

    async def stored(self, state: NeuronState) -> list[StoredModel]:
        return []


class Neurons:
    """A router over in-process neuron states whose lifecycle answers are scripted."""

    def __init__(self, gpus: dict[str, list[int]], models: list[dict[str, Any]]) -> None:
        self.settings = CortexSettings(
            neurons=[NeuronEntry(name=n, endpoint=f"http://{n}:1") for n in gpus]
        )
        self.settings.eviction.defrag_after_cycles = 0
        self.catalogue = parse_catalogue({"models": models}, "models.toml")
        self.fleet = Fleet(self.settings.neurons, self.settings.poller)
        for name, sizes in gpus.items():
            state = self.fleet.neurons[name]
            state.healthy = state.responsive = True
            state.discovery = discovery(name, sizes)
            state.health = health(sizes)
        self.metrics = Metrics()
        self.client = ScriptedClient()
        self.loads = Loads(self.settings, self.catalogue, self.fleet, self.metrics, self.client)
        self.router = Router(self.settings, self.catalogue, self.fleet, self.loads)
        self.posts = self.client.posts
        self.hold = self.client.hold

    def state(self, name: str) -> NeuronState:
        return self.fleet.neurons[name]

    def loads_posted(self) -> list[tuple[str, dict[str, Any]]]:
        return [(n, b) for n, p, b in self.posts if p == "/models/load"]


async def until(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def gpu_model(model_id: str, mb: int = 1000, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "vram_mb": mb, **extra}


def test_the_cold_load_names_the_device_it_made_room_on() -> None:
    """Placement picked device 1 (the one with room): the load must land there, not
    wherever the neuron would choose, or the room made is wasted."""
    neurons = Neurons({"n": [24000, 24000]}, [gpu_model("m/a", 8000)])
    neurons.state("n").health = health([2000, 20000])
    asyncio.run(neurons.router.route("m/a"))
    assert neurons.loads_posted() == [
        ("n", {"model_id": "m/a", "harness": "transformers", "devices": [1]})
    ]
    assert neurons.state("n").loaded("m/a") and neurons.state("n").reservations == {}


def test_cpu_placement_names_no_device() -> None:
    neurons = Neurons({"c": []}, [gpu_model("m/cpu", 100, min_devices=0)])
    neurons.state("c").health = health([], cpu_free=4000)
    asyncio.run(neurons.router.route("m/cpu"))
    assert neurons.loads_posted()[0][1]["devices"] == []


def test_requests_joining_a_load_in_progress_do_not_post_it_again() -> None:
    """The poll shows the model "loading" (cortex's own load): later requests join that
    load; one post, one cold start."""
    neurons = Neurons({"n": [24000]}, [gpu_model("m/a")])
    gate = neurons.hold[("n", "/models/load")] = asyncio.Event()

    async def scenario() -> list[NeuronState]:
        first = asyncio.ensure_future(neurons.router.route("m/a"))
        await until(neurons.loads_posted)
        # What the next poll reports while the neuron loads it.
        neurons.state("n").models["m/a"] = status("m/a", "loading")
        joiners = [asyncio.ensure_future(neurons.router.route("m/a")) for _ in range(5)]
        await asyncio.sleep(0.01)
        gate.set()
        return await asyncio.gather(first, *joiners)

    states = asyncio.run(scenario())
    assert {s.name for s in states} == {"n"}
    assert len(neurons.loads_posted()) == 1
    cold = neurons.metrics.cold_starts.labels("m/a", "n")._value.get()
    assert cold == 1


def test_a_neuron_pre_warming_the_model_is_waited_for_not_posted_to() -> None:
    neurons = Neurons({"n": [24000]}, [gpu_model("m/a")])
    state = neurons.state("n")
    state.models["m/a"] = status("m/a", "loading")  # the neuron's own pre-warm

    async def scenario() -> NeuronState:
        waiter = asyncio.ensure_future(neurons.router.route("m/a"))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        state.apply_poll([status("m/a")], health([23000]), state.poll_began())
        await neurons.fleet.poll_all()  # a round ends: waiters look again
        return await asyncio.wait_for(waiter, 5)

    neurons.fleet.poll_one = _no_poll  # type: ignore[method-assign]
    assert asyncio.run(scenario()).name == "n"
    assert neurons.loads_posted() == []


async def _no_poll(_state: NeuronState) -> None:
    return None


def test_defrag_waits_for_a_quiet_neuron_then_has_it_recycle_its_workers() -> None:
    neurons = Neurons({"n": [24000]}, [gpu_model(m) for m in ("m/a", "m/b")])
    state = neurons.state("n")
    for model_id in ("m/a", "m/b"):
        state.models[model_id] = status(model_id)
    state.cycles = 7
    state.begin_request("m/a")  # serving a request

    async def scenario() -> None:
        task = asyncio.ensure_future(neurons.loads.defrag(state))
        await asyncio.sleep(0.05)
        assert neurons.posts == []  # nothing is recycled while m/a serves
        state.end_request("m/a")
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    # One call: the neuron replaces its idle workers and reloads their models itself.
    assert [(p, b) for _n, p, b in neurons.posts] == [("/workers/recycle", {})]
    assert state.cycles == 0
    assert all(state.loaded(m) for m in ("m/a", "m/b"))


def test_a_hung_neuron_holds_up_only_the_loads_placed_on_it() -> None:
    """An eviction on neuron h hangs (the neuron stopped answering): a cold load placed on
    neuron n goes ahead meanwhile (no lock is held across a network call)."""
    neurons = Neurons(
        {"h": [24000], "n": [24000]},
        [
            gpu_model("m/old", 20000),
            gpu_model("m/new", 20000, pinned_on=["h"]),
            gpu_model("m/other", 1000, pinned_on=["n"]),
        ],
    )
    hung = neurons.state("h")
    hung.models["m/old"] = status("m/old")
    hung.health = health([23000])  # m/old's 20000 MB estimate leaves 4000 free
    gate = neurons.hold[("h", "/models/unload")] = asyncio.Event()

    async def scenario() -> None:
        stuck = asyncio.ensure_future(neurons.router.route("m/new"))
        await until(lambda: any(p == "/models/unload" for _n, p, _b in neurons.posts))
        other = await asyncio.wait_for(neurons.router.route("m/other"), 5)
        assert other.name == "n" and not stuck.done()
        assert not hung.loaded("m/old")  # the victim is off routing while it goes
        gate.set()
        assert (await stuck).name == "h"

    asyncio.run(scenario())


def test_busy_counts_cortexs_requests_and_others_the_neuron_reports() -> None:
    state = NeuronState("n", "http://n:1", pool=None)  # type: ignore[arg-type]
    state.models["m/a"] = status("m/a")
    state.begin_request("m/a")
    began = state.poll_began()
    state.asking_health()
    # The neuron reports 3 in flight + 1 queued: cortex's own one and 3 from elsewhere.
    state.apply_poll([status("m/a")], health([1000], {"m/a": (3, 1)}), began)
    assert state.busy("m/a") == 4
    state.end_request("m/a")
    assert state.busy("m/a") == 3  # the other clients' requests still count
    state.asking_health()
    state.apply_poll([status("m/a")], health([1000], {"m/a": (0, 0)}), state.poll_began())
    assert state.busy("m/a") == 0 and state.busy() == 0


def test_a_request_begun_while_health_is_asked_is_cortexs_own_not_anothers() -> None:
    """The neuron counted a request cortex began after asking: it is cortex's own, so once
    it ends the model is idle (not held busy by a phantom other client until the next
    poll, which made a cold load answer insufficient_capacity)."""
    state = NeuronState("n", "http://n:1", pool=None)  # type: ignore[arg-type]
    state.models["m/a"] = status("m/a")
    began = state.poll_began()
    state.asking_health()
    state.begin_request("m/a")  # reaches the neuron before it answers /health
    state.apply_poll([status("m/a")], health([1000], {"m/a": (1, 0)}), began)
    assert state.busy("m/a") == 1 and not state.has_others()
    state.end_request("m/a")
    assert state.busy("m/a") == 0
    state.begin_request("m/a")  # after the answer: no window open, nothing recorded
    state.end_request("m/a")
    state.asking_health()
    state.apply_poll([status("m/a")], health([1000], {"m/a": (1, 0)}), state.poll_began())
    assert state.busy("m/a") == 1 and state.has_others()  # this one is someone else's


def test_a_cold_load_asks_again_before_a_503_when_others_held_the_victim() -> None:
    """The only victim looked busy with another client's request as of the last poll; a
    fresh poll shows it idle, so it is evicted rather than the client getting a 503."""
    neurons = Neurons({"n": [2000]}, [gpu_model("m/old", 1500), gpu_model("m/new", 1500)])
    state = neurons.state("n")
    state.models["m/old"] = status("m/old")
    state.asking_health()
    state.apply_poll([status("m/old")], health([500], {"m/old": (1, 0)}), state.poll_began())
    polled: list[str] = []

    async def poll_one(polled_state: NeuronState) -> None:
        polled.append(polled_state.name)
        polled_state.asking_health()
        polled_state.apply_poll(
            [status("m/old")], health([500], {"m/old": (0, 0)}), polled_state.poll_began()
        )

    neurons.fleet.poll_one = poll_one  # type: ignore[method-assign]
    assert asyncio.run(neurons.router.route("m/new")).name == "n"
    assert polled == ["n"]
    assert [p for _n, p, b in neurons.posts] == ["/models/unload", "/models/load"]


def test_a_cold_load_asks_again_before_a_503_when_memory_figures_lagged() -> None:
    """No request held anything, but the last poll's free memory was taken while the
    device held more than it does now (a load or an unload in flight): a fresh poll shows
    the room, so the model loads instead of a 503."""
    neurons = Neurons({"n": [2000]}, [gpu_model("m/new", 1500)])
    state = neurons.state("n")
    state.asking_health()
    state.apply_poll([], health([100], {}), state.poll_began())  # 1 900 MB in use, then
    polled: list[str] = []

    async def poll_one(polled_state: NeuronState) -> None:
        polled.append(polled_state.name)
        polled_state.asking_health()
        polled_state.apply_poll([], health([1900], {}), polled_state.poll_began())

    neurons.fleet.poll_one = poll_one  # type: ignore[method-assign]
    assert asyncio.run(neurons.router.route("m/new")).name == "n"
    assert polled == ["n"]
    assert [p for _n, p, b in neurons.posts] == ["/models/load"]


def test_a_victim_still_busy_after_the_fresh_poll_is_a_503() -> None:
    neurons = Neurons({"n": [2000]}, [gpu_model("m/old", 1500), gpu_model("m/new", 1500)])
    state = neurons.state("n")
    state.models["m/old"] = status("m/old")
    busy = health([500], {"m/old": (1, 0)})
    state.asking_health()
    state.apply_poll([status("m/old")], busy, state.poll_began())
    polled: list[str] = []

    async def poll_one(polled_state: NeuronState) -> None:
        polled.append(polled_state.name)
        polled_state.asking_health()
        polled_state.apply_poll([status("m/old")], busy, polled_state.poll_began())

    neurons.fleet.poll_one = poll_one  # type: ignore[method-assign]
    with pytest.raises(ApiError) as info:
        asyncio.run(neurons.router.route("m/new"))
    assert info.value.code == "insufficient_capacity" and polled == ["n"]  # asked once


def test_a_model_that_landed_during_a_poll_is_counted_once() -> None:
    """A poll lists the models, cortex's load lands, then the poll's /health answers with
    the model in its memory figure: the model counts in that figure only."""
    neurons = Neurons({"n": [2000]}, [gpu_model("m/a", 500)])
    state = neurons.state("n")
    began = state.poll_began()
    state.landed(status("m/a"))  # 1000 MB, between the model list and /health
    with_it = health([1000], {"m/a": (0, 0)})
    with_it.models["m/a"].status = "loaded"
    state.apply_poll([], with_it, began)
    (device,) = view_of(state, neurons.catalogue).devices
    assert device.free_mb == 1000  # not 0: it is in the neuron's figure already
    without = health([2000])  # /health answered before it landed: count it here
    state.apply_poll([], without, began)
    (device,) = view_of(state, neurons.catalogue).devices
    assert device.free_mb == 1000


def test_a_poisoned_model_can_be_evicted_a_loading_one_cannot() -> None:
    neurons = Neurons({"n": [24000]}, [gpu_model("m/p"), gpu_model("m/l")])
    state = neurons.state("n")
    state.models["m/p"] = status("m/p", "poisoned")
    state.models["m/l"] = status("m/l", "loading")
    view = view_of(state, neurons.catalogue)
    residents = {r.model_id: r for r in view.residents}
    assert residents["m/p"].in_flight == 0 and residents["m/l"].in_flight == 1
    assert plan_eviction(list(view.residents), 0, 500, "lru") == ["m/p"]


def test_a_poll_that_began_before_an_unload_cannot_bring_the_model_back() -> None:
    state = NeuronState("n", "http://n:1", pool=None)  # type: ignore[arg-type]
    state.models["m/a"] = status("m/a")
    began = state.poll_began()
    state.begin_unload("m/a")
    state.end_unload("m/a", done=True)
    state.apply_poll([status("m/a")], health([1000]), began)  # the older snapshot
    assert "m/a" not in state.models
    state.apply_poll([status("m/a")], health([1000]), state.poll_began())  # a newer one
    assert state.loaded("m/a")  # (loaded again behind cortex's back: believed)


def test_the_poller_survives_an_unexpected_error_and_health_shows_a_stale_view() -> None:
    neurons = Neurons({"n": [24000]}, [gpu_model("m/a")])
    fleet = neurons.fleet
    fleet.settings.interval_s = 0.01
    calls = {"n": 0}

    async def flaky(_state: NeuronState) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the poller")

    fleet.poll_one = flaky  # type: ignore[method-assign]
    rounds: list[int] = []
    fleet._on_round = lambda: rounds.append(calls["n"])

    async def scenario() -> None:
        assert fleet.stale()  # never polled
        fleet.start()
        while len(rounds) < 3:
            await asyncio.sleep(0.01)
        assert not fleet.stale()
        await fleet.stop()

    asyncio.run(scenario())
    assert rounds[:3] == [1, 2, 3]  # the round with the error was logged, the loop went on
    fleet.last_round_at = -1e9
    assert fleet.stale()


def test_a_first_missed_health_check_stops_new_requests_where_another_replica_has_it() -> None:
    neurons = Neurons({"a": [24000], "b": [24000]}, [gpu_model("m/a")])
    for name in ("a", "b"):
        neurons.state(name).models["m/a"] = status("m/a")
    assert neurons.router.replica("m/a").name == "a"  # ties: the first listed
    neurons.fleet.report_failure(neurons.state("a"), OSError("timed out"))
    assert neurons.state("a").healthy and not neurons.state("a").responsive
    assert neurons.router.replica("m/a").name == "b"
    neurons.state("b").healthy = False
    assert neurons.router.replica("m/a").name == "a"  # the only one left: still tried


def test_cortex_never_imports_the_hub_client() -> None:
    """Sizes come from neurons: an offline gateway has nothing that could stall on the hub."""
    code = (
        "import sys, helexa.cortex.app, helexa.cortex.router, helexa.cortex.cli;"
        "sys.exit('huggingface_hub' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_spec_without_a_planned_pool_leaves_the_choice_to_the_neuron() -> None:
    neurons = Neurons({"n": [24000]}, [gpu_model("m/a")])
    profile = neurons.catalogue.profile("m/a")
    assert profile is not None
    assert "devices" not in Loads._spec(neurons.state("n"), profile)


def test_an_admin_load_keeps_its_neuron_locked_after_its_client_leaves() -> None:
    neurons = Neurons({"n": [24000]}, [gpu_model("m/a")])
    gate = neurons.hold[("n", "/models/load")] = asyncio.Event()

    async def scenario() -> None:
        caller = asyncio.ensure_future(neurons.router.admin_load("m/a", "n"))
        await until(neurons.loads_posted)
        caller.cancel()  # the admin client disconnects mid-load
        await asyncio.sleep(0.01)
        assert neurons.loads._neuron_locks["n"].locked()  # the load still owns the neuron
        gate.set()
        await until(lambda: not neurons.loads._neuron_locks["n"].locked())
        assert neurons.state("n").loaded("m/a")

    asyncio.run(scenario())


def test_a_local_folder_the_neuron_names_otherwise_is_a_400_naming_its_id() -> None:
    neurons = Neurons({"c": []}, [gpu_model("./models/x", 100, min_devices=0)])
    neurons.state("c").health = health([], cpu_free=4000)

    neurons.client.canonical["./models/x"] = "models/x"
    with pytest.raises(ApiError) as info:
        asyncio.run(neurons.router.route("./models/x"))
    assert info.value.status == 400 and info.value.code == "model_id_not_canonical"
    assert "'models/x'" in info.value.message


def test_a_down_neuron_says_since_when_and_why() -> None:
    from helexa.cortex.fleet import failure_reason
    from helexa.cortex.upstream import ConnectFailed

    refused = ConnectFailed("cannot connect to 127.0.0.1:1: [Errno 111] Connect call failed")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert failure_reason(refused) == "connection refused"
    assert failure_reason(TimeoutError()) == "timed out"
    assert failure_reason(OSError(113, "No route to host")) == "no route to host"
    assert failure_reason(ValueError("bad json")) == "bad json"

    state = NeuronState("n1", "http://n:1", pool=None)  # type: ignore[arg-type]
    assert state.why_unroutable() == "neuron n1 has not answered a poll yet"
    state.poll_failed(refused, unhealthy_after=3)
    first = state.down_since
    assert first is not None
    state.poll_failed(ValueError("later"), unhealthy_after=3)
    assert state.down_since == first  # since the first failure in a row
    reason = state.why_unroutable(now=first + 12.4)
    assert reason is not None and reason.startswith("neuron n1 down since ")
    assert reason.endswith(" UTC (12 s): later")
    state.apply_poll([status("m/a")], health([1000]), state.poll_began())
    assert state.why_unroutable() is None and state.down_since is None
    state.saw_draining()
    assert state.why_unroutable() == "neuron n1 is shutting down"


def test_a_draining_neuron_gets_no_new_request_even_as_the_only_replica() -> None:
    """Its /health says draining: the model is cold-loaded elsewhere rather than sent there
    (it would refuse it), no cold load is placed on it, and a model only it has (not in the
    catalogue) is a transient 503 naming the drain, not a 404."""
    neurons = Neurons({"a": [24000], "b": [24000]}, [gpu_model("m/a")])
    neurons.state("a").models["m/a"] = status("m/a")
    neurons.state("a").models["m/x"] = status("m/x")
    neurons.state("a").saw_draining()
    assert neurons.router.replica("m/a") is None
    state = asyncio.run(neurons.router.route("m/a"))
    assert state.name == "b" and [n for n, _b in neurons.loads_posted()] == ["b"]
    assert not view_of(neurons.state("a"), neurons.catalogue).healthy
    with pytest.raises(ApiError) as info:
        asyncio.run(neurons.router.route("m/x"))
    assert info.value.status == 503 and "shutting down: a" in info.value.message


def test_a_refused_poll_carries_the_neurons_own_words() -> None:
    from helexa.cortex.fleet import _said

    body = b'{"error": {"message": "add the name to [http] allowed_hosts", "code": "x"}}'
    assert _said(body) == ": add the name to [http] allowed_hosts"
    assert _said(b"<html>") == "" and _said(b'{"error": "flat"}') == ""


def test_a_pull_with_a_quant_is_a_gguf_pull_and_a_dense_profile_takes_none() -> None:
    neurons = Neurons({"n": [24000]}, [gpu_model("org/dense")])
    node, download = asyncio.run(neurons.loads.admin_pull("org/some-model", "n", "Q4_K_M"))
    assert node == "n" and download.state == "downloading"
    [(_n, path, spec)] = neurons.posts
    assert path == "/models/pull"
    assert (spec["harness"], spec["quant"]) == ("llamacpp", "Q4_K_M")  # not transformers
    with pytest.raises(ApiError) as info:
        asyncio.run(neurons.loads.admin_pull("org/dense", "n", "Q4_K_M"))
    assert info.value.status == 400 and info.value.param == "quant"


def test_an_admin_command_to_a_neuron_that_does_not_answer_is_a_503() -> None:
    from helexa.cortex.upstream import ConnectFailed

    neurons = Neurons({"n": [24000]}, [gpu_model("m/a")])

    async def unreachable(state: NeuronState, model_id: str) -> int:
        raise ConnectFailed("cannot connect to n:1")

    neurons.client.delete = unreachable  # type: ignore[method-assign]
    with pytest.raises(ApiError) as info:
        asyncio.run(neurons.loads.admin_delete("m/a", "n"))
    assert info.value.status == 503 and "cannot connect" in info.value.message
