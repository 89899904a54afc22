"""Pure decisions: feasibility, ranking, eviction plans, placement; catalogue and config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helexa.core.settings import ConfigError
from helexa.cortex.catalogue import ModelProfile, parse_catalogue
from helexa.cortex.config import load_config
from helexa.cortex.placement import (
    CPU_POOL,
    Device,
    NeuronView,
    Resident,
    feasible,
    place,
    plan_eviction,
    rank_neurons,
)
from tests.support.procs import console_script


def gpu(index: int, total: int, free: int) -> Device:
    return Device(index=index, total_mb=total, free_mb=free)


def view(
    name: str,
    devices=(),
    cpu_free: int = 0,
    residents=(),
    healthy=True,  # type: ignore[no-untyped-def]
    pending=None,
    loopback: bool = False,
) -> NeuronView:
    return NeuronView(
        name=name,
        healthy=healthy,
        devices=tuple(devices),
        cpu_free_mb=cpu_free,
        residents=tuple(residents),
        pending_mb=pending or {},
        loopback=loopback,
    )


def res(model: str, size: int, used: float, pool: int = 0, **kw) -> Resident:  # type: ignore[no-untyped-def]
    return Resident(model_id=model, size_mb=size, pools=(pool,), last_used=used, **kw)


BIG = ModelProfile(id="big", vram_mb=18000, min_device_vram_mb=16000)


def test_feasibility_follows_discovered_devices() -> None:
    assert feasible(BIG, view("beast", [gpu(0, 24000, 0)]))
    assert not feasible(BIG, view("small", [gpu(0, 12000, 12000)]))
    assert not feasible(BIG, view("cpu-box", cpu_free=64000))
    two = ModelProfile(id="two", vram_mb=40000, min_devices=2, min_device_vram_mb=20000)
    assert feasible(two, view("b", [gpu(0, 24000, 0), gpu(1, 24000, 0)]))
    assert not feasible(two, view("b", [gpu(0, 24000, 0), gpu(1, 12000, 0)]))
    cpu = ModelProfile(id="cpu", vram_mb=500, min_devices=0)
    assert feasible(cpu, view("cpu-box", cpu_free=100))
    pinned = ModelProfile(id="p", pinned_on=("benjy",))
    assert feasible(pinned, view("benjy", [gpu(0, 8000, 0)]))
    assert not feasible(pinned, view("other", [gpu(0, 80000, 0)]))


def test_ranking_pinned_first_then_free_memory_minus_pending() -> None:
    profile = ModelProfile(id="m", vram_mb=1000, pinned_on=("c", "a"))
    views = [
        view("a", [gpu(0, 24000, 5000)]),
        view("b", [gpu(0, 24000, 20000)]),
        view("c", [gpu(0, 24000, 9000)], pending={0: 6000}),
        view("d", [gpu(0, 24000, 23000)], healthy=False),
    ]
    assert [v.name for v in rank_neurons(profile, views)] == ["a", "c"]
    free_only = ModelProfile(id="m", vram_mb=1000)
    assert [v.name for v in rank_neurons(free_only, views)] == ["b", "a", "c"]


def test_lru_plan_skips_pinned_and_busy() -> None:
    residents = [
        res("old-pinned", 8000, 1, pinned=True),
        res("busy", 8000, 2, in_flight=1),
        res("older", 4000, 3),
        res("newer", 8000, 4),
    ]
    assert plan_eviction(residents, 2000, 10000, "lru") == ["older", "newer"]
    assert plan_eviction(residents, 2000, 2000, "lru") == []
    assert plan_eviction(residents, 2000, 30000, "lru") is None


def test_priority_plan_lowest_first_lru_among_equals() -> None:
    residents = [
        res("vip", 8000, 1, priority=10),
        res("low-new", 8000, 5, priority=1),
        res("low-old", 8000, 4, priority=1),
        res("mid", 8000, 2, priority=5),
    ]
    assert plan_eviction(residents, 0, 16000, "priority") == ["low-old", "low-new"]
    assert plan_eviction(residents, 0, 8000, "lru") == ["vip"]


def test_place_prefers_room_then_shortest_eviction() -> None:
    profile = ModelProfile(id="m", vram_mb=10000)
    roomy = view("roomy", [gpu(0, 24000, 12000)])
    full = view("full", [gpu(0, 24000, 2000)], residents=[res("x", 20000, 1)])
    assert place(profile, [full, roomy], 10000, "lru").neuron == "roomy"
    two_needed = view("two", [gpu(0, 24000, 0)], residents=[res("y", 6000, 1), res("z", 6000, 2)])
    decision = place(profile, [two_needed, full], 10000, "lru")
    assert (decision.neuron, decision.evict) == ("full", ("x",))
    stuck = view("stuck", [gpu(0, 24000, 0)], residents=[res("w", 24000, 1, in_flight=2)])
    assert place(profile, [stuck], 10000, "lru") is None


def test_cpu_profiles_use_the_cpu_budget_on_gpu_less_neurons() -> None:
    profile = ModelProfile(id="m", vram_mb=3000, min_devices=0)
    box = view("box", cpu_free=2000, residents=[res("idle", 2000, 1, pool=CPU_POOL)])
    decision = place(profile, [box], 3000, "lru")
    assert (decision.neuron, decision.pool, decision.evict) == ("box", CPU_POOL, ("idle",))
    gpu_host = view("gpu", [gpu(0, 24000, 20000)], cpu_free=100000)
    assert place(profile, [gpu_host], 3000, "lru").pool == 0  # GPUs preferred


# --- catalogue and config ---------------------------------------------------------------------


def test_catalogue_errors_name_the_entry() -> None:
    with pytest.raises(ConfigError) as info:
        parse_catalogue(
            {
                "models": [
                    {"id": "ok"},
                    {"id": "bad", "vram_mb": "lots"},
                    {"id": "ok"},
                    {"vram_mb": 1},
                ],
                "aliases": {"fast": "missing"},
            },
            "models.toml",
        )
    text = str(info.value)
    assert "models[1] (bad): vram_mb" in text
    assert "models[2] (ok): duplicate id" in text
    assert "models[3] (#3): id" in text
    assert "alias 'fast' points to 'missing'" in text


def write(dir_: Path, cortex: str, models: str) -> Path:
    (dir_ / "conf").mkdir(exist_ok=True)
    (dir_ / "conf" / "models.toml").write_text(models)
    path = dir_ / "conf" / "cortex.toml"
    path.write_text(cortex)
    return path


def test_relative_models_config_and_env_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        'models_config = "models.toml"\n[[neurons]]\nname = "beast"\n'
        'endpoint = "http://beast.internal:13131"\n',
        '[[models]]\nid = "Qwen/Qwen3-8B"\nvram_mb = 18000\npinned_on = ["beast"]\n'
        '[aliases]\n"helexa/balanced" = "Qwen/Qwen3-8B"\n',
    )
    monkeypatch.chdir("/")
    monkeypatch.setenv("CORTEX_GATEWAY__LISTEN", "127.0.0.1:4000")
    config = load_config(path)
    assert config.settings.gateway.listen == "127.0.0.1:4000"
    assert config.catalogue.resolve("helexa/balanced") == "Qwen/Qwen3-8B"


def test_config_cross_checks_and_cli(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'models_config = "models.toml"\n[[neurons]]\nname = "a"\nendpoint = "ftp://x"\n',
        '[[models]]\nid = "m"\npinned_on = ["ghost"]\n',
    )
    with pytest.raises(ConfigError, match=r"neurons\.0\.endpoint"):
        load_config(path)
    path.write_text(
        'models_config = "models.toml"\n[[neurons]]\nname = "a"\nendpoint = "http://a:1"\n'
    )
    with pytest.raises(ConfigError, match="pinned_on unknown neuron"):
        load_config(path)
    result = subprocess.run(
        [console_script("cortex"), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "ghost" in result.stderr
    (tmp_path / "conf" / "models.toml").write_text('[[models]]\nid = "m"\n')
    ok = subprocess.run(
        [console_script("cortex"), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0 and "1 neurons, 1 models" in ok.stdout


# --- weight sizes for profiles without vram_mb ------------------------------------------------


def test_need_is_the_size_a_neuron_reports_and_is_remembered() -> None:
    import asyncio

    from helexa.core.wire import ModelSize
    from helexa.cortex.placement import need_mb
    from helexa.cortex.weights import WeightSizes

    asked: list[tuple[str, str]] = []
    gib = 1024**3

    async def ask(name: str, profile: ModelProfile) -> ModelSize:
        asked.append((name, profile.id))
        if name == "empty" or profile.id == "nowhere/model":
            raise RuntimeError("model_weights_not_found")
        return ModelSize(bytes=12 * gib, weights_bytes=10 * gib, kv_bytes=2 * gib)

    sizes = WeightSizes()
    known = ModelProfile(id="org/model")
    unknown = ModelProfile(id="nowhere/model")

    async def scenario() -> None:
        sized = await sizes.mb(known, ["empty", "full"], ask)
        assert sized == 12 * 1024 == sizes.known_mb(known)
        assert need_mb(known, sized) == 12 * 1024  # the neuron's figure, not scaled again
        assert await sizes.mb(known, ["empty", "full"], ask) == sized  # remembered
        assert await sizes.mb(unknown, ["full"], ask) is None
        assert await sizes.mb(unknown, [], ask) is None  # no neuron to ask
        assert need_mb(unknown, None) == 0
        assert need_mb(ModelProfile(id="m", vram_mb=500), sized) == 500

    asyncio.run(scenario())
    assert asked == [("empty", "org/model"), ("full", "org/model"), ("full", "nowhere/model")]


def test_gguf_need_is_file_plus_kv(tmp_path: Path) -> None:
    """A GGUF profile without vram_mb needs its file as stored plus the KV cache llama.cpp
    allocates, as the neuron reports it: never the dequantized weights."""
    import asyncio

    from helexa.core.wire import ModelSpec
    from helexa.cortex.placement import need_mb
    from helexa.cortex.weights import MB, WeightSizes
    from helexa.neuron.config import LlamaCppHarnessSettings, TransformersHarnessSettings
    from helexa.neuron.devices import DevicePool
    from helexa.neuron.harness.llamacpp import plan
    from helexa.neuron.harness.llamacpp.harness import LlamaCppHarness
    from helexa.neuron.harness.transformers.harness import TransformersHarness
    from helexa.up.tiny_model import DEMO_SHAPE, write_tiny_model_to_hf_cache

    cache = tmp_path / "hub"
    snapshot = write_tiny_model_to_hf_cache(cache, "org/demo", with_gguf=True, **DEMO_SHAPE)
    pool = DevicePool([], cpu_threads=1, cpu_budget_bytes=1 << 30)
    settings = LlamaCppHarnessSettings(context_tokens=8192)
    llama = LlamaCppHarness(pool, settings=settings, hf_cache=cache, model_dirs=[], cpu_threads=1)
    dense = TransformersHarness(
        pool, settings=TransformersHarnessSettings(hf_cache=cache), model_dirs=[]
    )
    profile = ModelProfile(id="org/demo", quant="Q8_0", min_devices=0)

    async def ask(_name: str, p: ModelProfile):  # type: ignore[no-untyped-def]
        return await llama.size(ModelSpec(model_id=p.id, quant=p.quant))

    async def scenario() -> tuple[int | None, int]:
        sized = await WeightSizes().mb(profile, ["local"], ask)
        dequantized = await dense.size(ModelSpec(model_id="org/demo"))
        return sized, dequantized.weights_bytes

    sized, dequantized = asyncio.run(scenario())
    file_bytes = (snapshot / "tiny-qwen3-Q8_0.gguf").stat().st_size
    # DEMO_SHAPE: one layer, one KV head of 128; f16 K and V for every context token.
    kv = plan.kv_bytes(8192, n_layer=1, n_head_kv=1, head_k=128, head_v=128)
    assert kv == 8192 * 2 * 128 * plan.KV_ELEMENT_BYTES
    assert need_mb(profile, sized) == -(-(file_bytes + kv) // MB)
    assert file_bytes < dequantized  # Q8_0 as stored is smaller than fp32 weights


def test_the_load_owner_asks_the_neuron_placement_considers() -> None:
    """No vram_mb: the router asks /models/size of the neuron with the most room first (with
    the spec its load would send), falls back to another, and asks once per model."""
    import asyncio

    from helexa.core.wire import Discovery, Health, ModelSize
    from helexa.cortex.config import CortexSettings, NeuronEntry
    from helexa.cortex.fleet import Fleet
    from helexa.cortex.loads import Loads
    from helexa.cortex.metrics import Metrics
    from helexa.cortex.neuron_client import NeuronRefused
    from tests.support.wire import discovery_body, health_body

    settings = CortexSettings(
        neurons=[NeuronEntry(name=n, endpoint=f"http://{n}:1") for n in ("small", "big", "down")]
    )
    catalogue = parse_catalogue(
        {"models": [{"id": "org/m-GGUF", "quant": "Q4_K_M", "min_devices": 0}]}, "models.toml"
    )
    fleet = Fleet(settings.neurons, settings.poller)
    for name, free in (("small", 1000), ("big", 9000), ("down", 99000)):
        state = fleet.neurons[name]
        state.healthy = state.responsive = name != "down"
        state.discovery = Discovery.model_validate(discovery_body([], ("llamacpp",), hostname=name))
        state.health = Health.model_validate(health_body([], cpu_free_mb=free))
    calls: list[tuple[str, str, dict]] = []

    class Sizes:  # the neurons' /models/size, scripted: "big" is busy
        async def size(self, state, spec):  # type: ignore[no-untyped-def]
            calls.append((state.name, "/models/size", spec))
            if state.name == "big":
                raise NeuronRefused(503, {"message": "busy"})
            return ModelSize(bytes=700 * 1024 * 1024 + 1, weights_bytes=600, kv_bytes=100)

    loads = Loads(settings, catalogue, fleet, Metrics(), Sizes())  # type: ignore[arg-type]
    profile = catalogue.profile("org/m-GGUF")
    assert profile is not None and profile.harness == "llamacpp"
    need = asyncio.run(loads._need(profile, frozenset()))
    assert need == 701
    spec = {"model_id": "org/m-GGUF", "harness": "llamacpp", "quant": "Q4_K_M", "devices": []}
    assert calls == [("big", "/models/size", spec), ("small", "/models/size", spec)]
    assert asyncio.run(loads._need(profile, frozenset())) == 701 and len(calls) == 2


def test_replica_choice_keeps_a_conversation_on_its_replica() -> None:
    from helexa.cortex.placement import choose_replica

    replicas = [("n1", 3), ("n2", 0), ("n3", 1)]
    assert choose_replica(replicas, None) == "n2"  # least busy
    assert choose_replica(replicas, "n1") == "n1"  # its own, though busier
    assert choose_replica([("n2", 0), ("n3", 1)], "n1") == "n2"  # its own is gone
    assert choose_replica([], "n1") is None


def test_affinity_table_is_bounded_lru() -> None:
    from helexa.cortex.affinity import AffinityTable

    table: AffinityTable[str, str] = AffinityTable(capacity=2)
    table.remember("a", "n1")
    table.remember("b", "n2")
    assert table.get("a") == "n1"  # touched: "b" is now the oldest
    table.remember("c", "n3")
    assert (table.get("a"), table.get("b"), table.get("c"), len(table)) == ("n1", None, "n3", 2)


def test_fallbacks_match_in_order_and_are_checked() -> None:
    catalogue = parse_catalogue(
        {
            "models": [{"id": "org/big"}, {"id": "org/small"}],
            "aliases": {"helexa/default": "org/big"},
            "fallbacks": {"claude-3-haiku*": "org/small", "claude-*": "helexa/default"},
        },
        "models.toml",
    )
    assert catalogue.fallback_for("claude-3-haiku-2024") == "org/small"
    assert catalogue.fallback_for("claude-opus-4-8") == "org/big"  # through the alias
    assert catalogue.fallback_for("gpt-4o") is None
    with pytest.raises(ConfigError, match="fallback 'x-\\*' points to 'org/none'"):
        parse_catalogue({"models": [{"id": "org/big"}], "fallbacks": {"x-*": "org/none"}}, "m")
