"""Weights downloaded in the background with progress, through huggingface_hub's real
download path against a local stand-in for the hub (``tests/support/fake_hub.py``, serving
the real GGUF slowly): a cold load starts the download and answers 503 with Retry-After
and the progress in its message; ``/health`` shows bytes done, total and rate; once done
the load succeeds. ``POST /models/pull`` does the same without a load; a neuron without
hub access says so."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fake_hub import FakeHub
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, console_script, start_neuron, wait_for

REPO = "helexa-test/SmolLM2-135M-Instruct-GGUF"
OTHER = "helexa-test/Other-GGUF"  # the same file under other names, for cortex's commands
THIRD = "helexa-test/Third-GGUF"
FOURTH = "helexa-test/Fourth-GGUF"  # in no catalogue: pulled with --quant
CONFIG = """
harnesses = [{name = "llamacpp"}]
[harness.llamacpp]
context_tokens = 2048
"""


@pytest.fixture(scope="module")
def hub(real_models: tuple[Path, Path]) -> Iterator[FakeHub]:
    gguf = real_models[0]
    served = FakeHub(  # ~4 s for 94 MB
        {repo: {gguf.name: gguf} for repo in (REPO, OTHER, THIRD, FOURTH)}, bytes_per_s=25e6
    )
    yield served
    served.stop()


@pytest.fixture(scope="module")
def online(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> Iterator[tuple[Daemon, str]]:
    work = tmp_path_factory.mktemp("downloads")
    daemon, base = start_neuron(
        work,
        CONFIG,
        hf_cache=work / "hub-cache",  # empty: everything comes from the stand-in
        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url},
    )
    yield daemon, base
    daemon.stop()


def downloads(base: str) -> list[dict]:  # type: ignore[type-arg]
    return httpx.get(f"{base}/health", timeout=5).json()["downloads"]


def test_a_cold_load_downloads_in_the_background_with_progress(
    online: tuple[Daemon, str],
) -> None:
    _daemon, base = online
    spec = {"model_id": REPO, "quant": "Q4_1"}
    first = httpx.post(f"{base}/models/load", json=spec, timeout=30)
    assert first.status_code == 503, first.text
    assert int(first.headers["retry-after"]) >= 2
    error = first.json()["error"]
    assert error["code"] == "downloading"
    assert error["message"].startswith(f"downloading {REPO} Q4_1: ")

    seen: list[dict] = []  # type: ignore[type-arg]

    def finished() -> bool:
        (pull,) = downloads(base)
        seen.append(pull)
        return pull["state"] == "done"

    wait_for("the download", finished, timeout=60)
    partway = [p for p in seen if p["total_bytes"] and 0 < p["done_bytes"] < p["total_bytes"]]
    assert partway, seen  # progress was visible while it ran
    assert any(p["rate_bytes_s"] for p in partway) and any(p["eta_s"] for p in partway)
    assert seen[-1]["done_bytes"] == seen[-1]["total_bytes"] > 90_000_000

    again = httpx.post(f"{base}/models/load", json=spec, timeout=120)
    assert again.status_code == 200, again.text
    chat = {
        "model": REPO,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    answer = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    # Asked again, it is there: nothing is downloaded twice.
    pulled = httpx.post(f"{base}/models/pull", json=spec, timeout=30)
    assert pulled.status_code == 200 and pulled.json()["state"] == "done"


def test_a_pull_the_hub_refuses_says_why(online: tuple[Daemon, str]) -> None:
    _daemon, base = online
    spec = {"model_id": "helexa-test/no-such-model-GGUF", "quant": "Q4_1"}
    started = httpx.post(f"{base}/models/pull", json=spec, timeout=30)
    assert started.status_code == 200 and started.json()["state"] == "downloading"

    def failed() -> dict | None:  # type: ignore[type-arg]
        return next(
            (p for p in downloads(base) if p["model_id"] == spec["model_id"] and p["error"]),
            None,
        )

    wait_for("the failure", failed, timeout=30)
    assert failed()["state"] == "failed"  # type: ignore[index]
    load = httpx.post(f"{base}/models/load", json=spec, timeout=30)
    assert load.status_code == 503 and load.json()["error"]["code"] == "download_failed"
    no_quant = httpx.post(f"{base}/models/pull", json={"model_id": REPO}, timeout=30)
    assert no_quant.status_code == 400 and "quant" in no_quant.json()["error"]["message"]


def test_a_neuron_without_hub_access_says_so(
    tmp_path: Path, hf_cache: Path, real_models: tuple[Path, Path]
) -> None:
    daemon, base = start_neuron(tmp_path, CONFIG, hf_cache=tmp_path / "cache")  # offline
    try:
        refused = httpx.post(
            f"{base}/models/pull", json={"model_id": REPO, "quant": "Q4_1"}, timeout=30
        )
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "hub_offline"
        assert "HF_HUB_OFFLINE" in refused.json()["error"]["message"]
        httpx.post(f"{base}/models/pull", json={"model_id": REPO, "quant": "Q4_1"}, timeout=30)
        assert daemon.log().count("no hub access") == 1  # said once
        # A load does what it did: the weights are missing, and that is a 404.
        load = httpx.post(
            f"{base}/models/load", json={"model_id": REPO, "quant": "Q4_1"}, timeout=30
        )
        assert load.status_code == 404
    finally:
        daemon.stop()


def cortex_cli(*args: str, api: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script("cortex"), "models", *args, "--endpoint", api],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_cortex_pulls_lists_and_deletes_weights_and_says_a_cold_load_is_downloading(
    tmp_path: Path, online: tuple[Daemon, str]
) -> None:
    _daemon, base = online
    models = "".join(
        f'[[models]]\nid = "{repo}"\nquant = "Q4_1"\nmin_devices = 0\nvram_mb = 150\n'
        for repo in (OTHER, THIRD)
    )
    cortex, api, _metrics = start_cortex(tmp_path, {"n1": base}, models)
    try:
        assert OTHER not in cortex_cli("ls", api=api).stdout
        pulled = cortex_cli("pull", OTHER, api=api)
        assert pulled.returncode == 0, pulled.stderr
        assert f"{OTHER}: on n1" in pulled.stdout
        listed = cortex_cli("ls", api=api)
        assert listed.returncode == 0 and f"{OTHER}" in listed.stdout
        assert "n1 (cache)" in listed.stdout
        assert cortex_cli("pull", OTHER, api=api).stdout.strip() == f"{OTHER}: already on n1"
        # A model the catalogue does not list: its GGUF file named on the command line.
        no_quant = cortex_cli("pull", FOURTH, "--node", "n1", api=api)
        assert no_quant.returncode == 1 and "quant" in no_quant.stderr
        fourth = cortex_cli("pull", FOURTH, "--node", "n1", "--quant", "Q4_1", api=api)
        assert fourth.returncode == 0 and f"{FOURTH}: on n1" in fourth.stdout, fourth.stderr
        assert FOURTH in cortex_cli("ls", api=api).stdout

        # A cold load of weights no neuron has: 503, Retry-After, and the progress.
        chat = {"model": THIRD, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        cold = httpx.post(f"{api}/v1/chat/completions", json=chat, timeout=60)
        assert cold.status_code == 503 and cold.headers["retry-after"]
        error = cold.json()["error"]
        assert error["code"] == "downloading", error
        assert f"downloading {THIRD} Q4_1: " in error["message"]

        removed = cortex_cli("rm", OTHER, "--node", "n1", api=api)
        assert removed.returncode == 0, removed.stderr
        assert OTHER not in cortex_cli("ls", api=api).stdout
        again = cortex_cli("rm", OTHER, "--node", "n1", api=api)
        assert again.returncode == 1 and "not in this neuron's Hugging Face cache" in again.stderr
    finally:
        cortex.stop()
