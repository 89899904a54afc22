"""``cortex up`` gets a hub model's weights through the neuron's public API, as any client
would: ``POST /models/pull`` (offline: is it here?; with the hub: download it) and
``/health``'s downloads (a progress bar), ``POST /models/load``. The neuron is a real one,
its hub a local stand-in (``tests/support/fake_hub.py``, ``HF_ENDPOINT``) serving the real
SmolLM2 GGUF."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from helexa.up.run import LocalFleet, UpFailed, pick_quant
from tests.support.fake_hub import FakeHub
from tests.support.procs import free_port

REPO = "helexa-test/SmolLM2-135M-Instruct-GGUF"


@pytest.fixture(scope="module")
def hub(real_models: tuple[Path, Path]) -> Iterator[FakeHub]:
    gguf = real_models[0]
    served = FakeHub({REPO: {gguf.name: gguf}}, bytes_per_s=40e6)  # ~2.5 s for 94 MB
    yield served
    served.stop()


def fleet(work: Path, cache: Path, model: str = REPO) -> tuple[LocalFleet, io.StringIO]:
    out = io.StringIO()
    made = LocalFleet(
        host="127.0.0.1",
        port=free_port(),
        model=model,
        quant="Q4_1",
        tiny=False,
        workdir=work,
        console=Console(file=out, width=200, highlight=False),
    )
    made.cache = cache  # where the neuron keeps what it downloads
    return made, out


def test_a_missing_model_is_downloaded_by_the_neuron_with_progress_then_loaded(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the neuron's hub, and the one probed
    cache = tmp_path / "hub-cache"
    up, out = fleet(tmp_path / "work", cache)
    seen: list[dict[str, Any]] = []
    read = up.download_info

    def recorded() -> dict[str, Any] | None:
        info = read()
        if info is not None:
            seen.append(info)
        return info

    monkeypatch.setattr(up, "download_info", recorded)
    try:
        up.prepare_model()
        assert up.kind == "hub"
        assert up.neuron is None  # the neuron that downloaded is gone: one serves offline
        printed = out.getvalue()
        assert f"downloading {REPO} (Q4_1) into {cache}" in printed
        assert f"✓ {REPO} (Q4_1) downloaded into {cache}" in printed
        # The neuron downloaded it (cortex up has no download of its own), and /health
        # showed it on its way.
        log = (tmp_path / "work" / "neuron.log").read_text()
        assert 'msg="download started"' in log and 'msg="download done"' in log
        assert any(r.startswith("GET /helexa-test/") for r in hub.requests)
        partway = [s for s in seen if s["total_bytes"] and 0 < s["done_bytes"] < s["total_bytes"]]
        assert partway and seen[-1]["state"] == "done", seen
        assert list(cache.glob("models--helexa-test--*/snapshots/*/*Q4_1*.gguf"))
        up.start_neuron()
        assert up.neuron is not None
        environ = Path(f"/proc/{up.neuron.proc.pid}/environ").read_bytes().split(b"\0")
        assert b"HF_HUB_OFFLINE=1" in environ
        up.load()
        [served] = httpx.get(f"{up.neuron_url}/models", timeout=5).json()
        assert served["id"] == REPO and served["harness"] == "llamacpp"
    finally:
        up.shutdown()

    # Run again: the neuron, offline, says it holds the model; nothing is downloaded.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # no hub at all
    again, out = fleet(tmp_path / "again", cache)
    try:
        again.prepare_model()
        assert f"✓ {REPO} (Q4_1) is in the cache ({cache})" in out.getvalue()
        assert "downloading" not in out.getvalue()
        health = httpx.get(f"{again.neuron_url}/health", timeout=5).json()
        assert health["downloads"] == []
    finally:
        again.shutdown()


def test_a_download_the_hub_refuses_says_why_and_what_to_run(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    up, _out = fleet(tmp_path / "work", tmp_path / "hub-cache", model="helexa-test/absent-GGUF")
    try:
        with pytest.raises(UpFailed) as failed:
            up.prepare_model()
        message = " ".join(str(failed.value).split())
        assert message.startswith("downloading helexa-test/absent-GGUF (Q4_1) failed: ")
        assert "Run the same command again to resume" in message
        assert "cortex up --tiny" in message
    finally:
        up.shutdown()
    assert up.children == []


def test_the_quant_defaults_to_q8_0_for_gguf_repos_only() -> None:
    assert pick_quant("Qwen/Qwen3-0.6B-GGUF", None) == "Q8_0"
    assert pick_quant("Qwen/Qwen3-8B", None) is None  # dense: safetensors on transformers
    assert pick_quant("Qwen/Qwen3-0.6B-GGUF", "Q4_K_M") == "Q4_K_M"
