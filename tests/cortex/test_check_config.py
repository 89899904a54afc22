"""``cortex check-config``: which files it read, and warnings (never failures) about models
no configured neuron could host, judged from each neuron's own /discovery and /health."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helexa.core.wire import Discovery, Health
from helexa.cortex.catalogue import parse_catalogue
from helexa.cortex.checkconfig import (
    KNOWN_HARNESSES,
    Probe,
    hardware_warnings,
    neuron_token,
    static_warnings,
)
from helexa.cortex.config import CortexSettings
from tests.support.procs import console_script, free_port
from tests.support.wire import discovery_body, health_body


def discovery(gpus: list[int], harnesses: tuple[str, ...] = KNOWN_HARNESSES) -> dict[str, Any]:
    return discovery_body(gpus, harnesses, memory_mb=16000)


def health(gpus: list[int]) -> dict[str, Any]:
    return health_body(gpus, cpu_free_mb=16000)


def probe(name: str, gpus: list[int], harnesses: tuple[str, ...] = KNOWN_HARNESSES) -> Probe:
    return Probe(
        name,
        f"http://{name}:13131",
        discovery=Discovery.model_validate(discovery(gpus, harnesses)),
        health=Health.model_validate(health(gpus)),
    )


def catalogue(text: str) -> Any:
    import tomllib

    return parse_catalogue(tomllib.loads(text), "models.toml")


def test_the_harness_names_are_the_neurons_own() -> None:
    from helexa.neuron.harness.registry import KNOWN

    assert set(KNOWN_HARNESSES) == set(KNOWN)


def test_a_cpu_only_fleet_names_min_devices_0() -> None:
    models = catalogue(
        '[[models]]\nid = "org/dense"\n[[models]]\nid = "org/cpu"\nmin_devices = 0\n'
        '[[models]]\nid = "org/explicit"\nmin_devices = 1\n'
    )
    warnings = hardware_warnings(models, [probe("a", []), probe("b", [])])
    assert len(warnings) == 2  # org/cpu may run on a CPU budget
    dense, explicit = warnings
    assert dense.startswith("model org/dense: no neuron can host it (needs 1 GPU; a has 0 GPUs")
    assert "min_devices is 1 (the default)" in dense and "`min_devices = 0`" in dense
    assert "min_devices is 1:" in explicit  # set by hand: not called the default


def test_gpu_count_size_harness_and_memory() -> None:
    models = catalogue(
        '[[models]]\nid = "org/two"\nmin_devices = 2\n'
        '[[models]]\nid = "org/big-card"\nmin_device_vram_mb = 40000\n'
        '[[models]]\nid = "org/x-GGUF"\nquant = "Q4_K_M"\n'
        '[[models]]\nid = "org/huge"\nvram_mb = 30000\n'
        '[[models]]\nid = "org/fits"\nvram_mb = 20000\n'
    )
    dense = ("transformers",)
    probes = [probe("a", [24000], harnesses=dense), probe("b", [12000, 12000], harnesses=dense)]
    by_model = {w.split(":")[0]: w for w in hardware_warnings(models, probes)}
    assert set(by_model) == {"model org/big-card", "model org/x-GGUF", "model org/huge"}
    assert "needs 1 GPU of at least 40000 MB" in by_model["model org/big-card"]
    assert "b has 2 GPUs (0 large enough)" in by_model["model org/big-card"]
    assert "min_devices = 0" not in by_model["model org/big-card"]  # GPUs exist: not the hint
    assert "llamacpp harness, which no feasible neuron runs" in by_model["model org/x-GGUF"]
    assert "at most 24000 MB" in by_model["model org/huge"]


def test_unreachable_neurons_narrow_the_claim_and_nothing_reachable_says_nothing() -> None:
    models = catalogue('[[models]]\nid = "org/dense"\n')
    down = Probe("b", "http://b:13131", error="ConnectError: refused")
    [warning] = hardware_warnings(models, [probe("a", []), down])
    assert warning.startswith("model org/dense: no reachable neuron can host it")
    assert hardware_warnings(models, [down]) == []


def test_static_warnings_need_no_neuron() -> None:
    models = catalogue('[[models]]\nid = "org/m"\nharness = "vllm"\n')
    warnings = static_warnings(CortexSettings(), models)
    assert any(w.startswith("no [[neurons]] configured") for w in warnings)
    assert any("harness 'vllm' is not one a neuron runs" in w for w in warnings)


def test_the_token_sent_to_neurons() -> None:
    settings = CortexSettings.model_validate(
        {"admin_token": "adm", "neurons": [{"name": "a", "endpoint": "http://a:1"}]}
    )
    assert neuron_token(settings, settings.neurons[0]) == "adm"
    if "neuron_token" in CortexSettings.model_fields:  # the shared neuron token, once it exists
        settings = settings.model_copy(update={"neuron_token": "shared"})
        assert neuron_token(settings, settings.neurons[0]) == "shared"


# --- the command, against a stand-in neuron ----------------------------------------------------


@pytest.fixture
def cpu_neuron() -> Iterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, "auth": self.headers.get("authorization", "")})
            body = {"/discovery": discovery([]), "/health": health([])}.get(self.path)
            payload = json.dumps(body).encode()
            self.send_response(200 if body else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script("cortex"), "check-config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_check_config_reports_files_neurons_and_cpu_only_fleets(
    tmp_path: Path, cpu_neuron: tuple[str, list[dict[str, str]]]
) -> None:
    endpoint, seen = cpu_neuron
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "models.toml").write_text('[[models]]\nid = "org/dense"\n')
    (conf / "cortex.toml").write_text(
        'models_config = "models.toml"\nadmin_token = "secret"\n'
        f'[[neurons]]\nname = "cpu"\nendpoint = "{endpoint}"\n'
        f'[[neurons]]\nname = "gone"\nendpoint = "http://127.0.0.1:{free_port()}"\n'
    )
    result = run(str(conf / "cortex.toml"), "--timeout", "2")
    assert result.returncode == 0, result.stdout + result.stderr  # warnings do not fail
    out = result.stdout
    assert f"checking {conf / 'cortex.toml'}" in out
    assert f"models: {conf / 'models.toml'}" in out
    assert "neuron cpu" in out and "0 GPUs, CPU budget 16000 MB" in out
    assert "warning: neuron gone" in out and "is unreachable" in out
    assert "warning: model org/dense: no reachable neuron can host it" in out
    assert "`min_devices = 0`" in out
    assert "ok (2 warnings)" in out
    assert {s["path"] for s in seen} == {"/discovery", "/health"}
    assert all(s["auth"] == "Bearer secret" for s in seen)

    offline = run(str(conf / "cortex.toml"), "--offline")
    assert offline.returncode == 0 and "not contacted" in offline.stdout
    assert "warning" not in offline.stdout
    assert len(seen) == 2  # --offline asked nobody


def test_check_config_without_a_path_names_the_default(tmp_path: Path) -> None:
    result = run(cwd=tmp_path)
    if Path("/etc/cortex/cortex.toml").exists():
        pytest.skip("this host has a real /etc/cortex/cortex.toml")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "cortex check-config: /etc/cortex/cortex.toml does not exist; pass the path: "
        "cortex check-config path/to/cortex.toml"
    )
    missing = run(str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and f"{tmp_path / 'nope.toml'} does not exist" in missing.stderr


def test_a_bad_catalogue_fails_and_says_which_file(tmp_path: Path) -> None:
    (tmp_path / "cortex.toml").write_text('models_config = "models.toml"\n')
    (tmp_path / "models.toml").write_text('[[models]]\nid = "m"\nvram_mb = "lots"\n')
    result = run(str(tmp_path / "cortex.toml"), "--offline")
    assert result.returncode == 1
    assert f"models: {tmp_path / 'models.toml'}" in result.stdout
    assert "vram_mb" in result.stderr and "invalid" in result.stderr


def test_cortex_version() -> None:
    from helexa import __version__

    result = subprocess.run(
        [console_script("cortex"), "--version"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout.strip() == f"cortex {__version__}"
