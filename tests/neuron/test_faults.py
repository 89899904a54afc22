"""Failures inside generation, through the real harness and app with an injected fault:
an error frame mid-stream (never a silent [DONE]), and a poisoned device worker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from helexa.core.settings import load_settings
from helexa.core.wire import ModelSpec
from helexa.neuron.app import build_app
from helexa.neuron.config import NeuronSettings
from helexa.neuron.harness.transformers.batched import PagedBackend
from helexa.neuron.service import Neuron
from helexa.up.tiny_model import write_tiny_model
from tests.conftest import LOCAL_MODEL
from tests.support.inprocess import IN_PROCESS, sse_frames
from tests.support.procs import start_neuron

ADMIN = {"authorization": "Bearer s3cret"}
BODY = {
    "model": LOCAL_MODEL,
    "stream": True,
    "max_tokens": 50,
    "temperature": 0,
    "messages": [{"role": "user", "content": "weather"}],
}


def fail_after(monkeypatch: pytest.MonkeyPatch, calls: int, error: BaseException) -> None:
    original = PagedBackend._forward
    count = {"n": 0}

    def forward(self: PagedBackend, chunks):  # type: ignore[no-untyped-def]
        count["n"] += 1
        if count["n"] > calls:
            raise error
        return original(self, chunks)

    monkeypatch.setattr(PagedBackend, "_forward", forward)


def test_mid_stream_failures(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(
        NeuronSettings, None, {"model_dirs": [model_dir], "token": "s3cret", "workers": IN_PROCESS}
    )

    async def scenario() -> None:
        neuron = Neuron(settings)
        neuron.start()
        try:
            await neuron.load(ModelSpec(model_id=LOCAL_MODEL))
            transport = httpx.ASGITransport(app=build_app(neuron))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost", headers=ADMIN
            ) as client:
                # Every route but /health wants the token (tests/neuron/test_auth.py: more).
                wrong = {"authorization": "Bearer nope"}
                unload = {"model_id": LOCAL_MODEL}
                denied = await client.post("/models/unload", json=unload, headers=wrong)
                assert denied.status_code == 401
                assert denied.json()["error"]["type"] == "authentication_error"
                size = {"model_id": LOCAL_MODEL}
                refused = await client.post("/models/size", json=size, headers=wrong)
                assert refused.status_code == 401
                sized = await client.post("/models/size", json=size, headers=ADMIN)
                assert sized.status_code == 200 and sized.json()["weights_bytes"] > 0

                # An ordinary error after a few tokens: an error frame, no [DONE], no poison.
                fail_after(monkeypatch, 4, ValueError("boom"))
                raw = (await client.post("/v1/chat/completions", json=BODY)).text
                data = sse_frames(raw)
                assert data[-1] != "[DONE]"
                error = json.loads(data[-1])["error"]
                assert error["code"] == "generation_failed" and "boom" in error["message"]
                assert any("content" in json.loads(d)["choices"][0]["delta"] for d in data[1:-1])
                assert neuron.engines.pool.worker("cpu").poisoned is None
                monkeypatch.undo()

                # A CUDA fault: error frame, the worker is poisoned, the model says so.
                fail_after(monkeypatch, 2, RuntimeError("CUDA error: an illegal memory access"))
                raw = (await client.post("/v1/chat/completions", json=BODY)).text
                error = json.loads(sse_frames(raw)[-1])["error"]
                assert error["code"] == "device_poisoned"
                assert "cpu worker is poisoned" in error["message"]
                models = (await client.get("/models")).json()
                assert [m["status"] for m in models] == ["poisoned"]
                again = await client.post("/v1/chat/completions", json={**BODY, "stream": False})
                assert again.status_code == 503 and again.headers["retry-after"]
                assert again.json()["error"]["code"] == "device_poisoned"
                streamed = await client.post("/v1/chat/completions", json=BODY)
                assert streamed.status_code == 503  # refused before any 200 was sent
                assert streamed.json()["error"]["code"] == "device_poisoned"
                refused = await client.post(
                    "/models/load", json={"model_id": "bogus-arch"}, headers=ADMIN
                )
                assert refused.status_code in (400, 503)  # checked before placement
                write_tiny_model(model_dir / "poison-probe")
                other = await client.post(
                    "/models/load", json={"model_id": "poison-probe"}, headers=ADMIN
                )
                assert other.status_code == 503
                assert other.json()["error"]["code"] == "device_poisoned"
                # Recovery path: the poisoned model can still be unloaded.
                gone = await client.post(
                    "/models/unload", json={"model_id": LOCAL_MODEL}, headers=ADMIN
                )
                assert gone.status_code == 200
        finally:
            await neuron.stop()

    asyncio.run(scenario())


def test_a_fatal_signal_leaves_the_stack_in_the_log(tmp_path: Path, hf_cache: Path) -> None:
    """A native crash (here SIGSEGV; an engine's SIGILL or abort alike) writes every thread's
    Python stack to the neuron's log instead of dying silently."""
    import signal

    daemon, _base = start_neuron(tmp_path, "", hf_cache=hf_cache, ready_models=False)
    daemon.signal(signal.SIGSEGV)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == -signal.SIGSEGV
    log = daemon.log()
    assert "Fatal Python error: Segmentation fault" in log, log[-2000:]
    assert "Thread 0x" in log or "Current thread 0x" in log
