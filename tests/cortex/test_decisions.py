"""Pure decisions: feasibility, ranking, eviction plans, placement; catalogue and config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helexa.core.catalogue import ModelProfile, parse_catalogue
from helexa.core.placement import (
    CPU_POOL,
    Device,
    NeuronView,
    Resident,
    feasible,
    place,
    plan_eviction,
    rank_neurons,
)
from helexa.core.settings import ConfigError
from helexa.cortex.config import load_config
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
) -> NeuronView:
    return NeuronView(
        name=name,
        healthy=healthy,
        devices=tuple(devices),
        cpu_free_mb=cpu_free,
        residents=tuple(residents),
        pending_mb=pending or {},
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


def test_weight_bytes_from_a_listing() -> None:
    from helexa.cortex.weights import weights_bytes

    listing = [
        ("model-00001-of-00002.safetensors", 4_000),
        ("model-00002-of-00002.safetensors", 1_000),
        ("m-Q4_K_M.gguf", 700),
        ("m-Q8_0.gguf", 1_200),
        ("README.md", 5),
    ]
    assert weights_bytes(listing, None) == 5_000
    assert weights_bytes(listing, "q4_k_m") == 700
    assert weights_bytes(listing, "Q2_K") is None
    assert weights_bytes([("x.safetensors", None)], None) is None


def test_need_follows_weights_and_unknown_is_remembered() -> None:
    import asyncio

    from helexa.core.placement import need_mb
    from helexa.cortex.weights import WeightSizes

    calls: list[str] = []

    def fetch(model_id: str) -> list[tuple[str, int]]:
        calls.append(model_id)
        if model_id == "offline/model":
            raise OSError("hub unreachable")
        return [("model.safetensors", 10 * 1024 * 1024 * 1024)]

    sizes = WeightSizes(fetch)
    known = ModelProfile(id="org/model")
    unknown = ModelProfile(id="offline/model")

    async def scenario() -> None:
        weights = await sizes.mb(known)
        assert weights == 10 * 1024
        assert need_mb(known, weights) == int(1.2 * 10 * 1024)
        assert await sizes.mb(unknown) is None and await sizes.mb(unknown) is None
        await sizes.mb(known)

    asyncio.run(scenario())
    assert calls == ["org/model", "offline/model"]  # each asked once


def test_weight_bytes_skip_duplicate_consolidated_files() -> None:
    from helexa.cortex.weights import weights_bytes

    listing = [
        ("consolidated.safetensors", 9_000),
        ("model-00001-of-00002.safetensors", 5_000),
        ("model-00002-of-00002.safetensors", 4_000),
        ("original/x.safetensors", 9_000),
    ]
    assert weights_bytes(listing, None) == 9_000
    assert weights_bytes([("consolidated.safetensors", 7)], None) == 7


def test_replica_choice_keeps_a_conversation_on_its_replica() -> None:
    from helexa.core.placement import choose_replica

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
