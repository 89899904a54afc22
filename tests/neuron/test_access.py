"""The neuron's access log: one line per request (method, path, status, outcome, secs,
model, and the tokens of inference requests), the routes cortex polls at debug so a journal
shows requests rather than the poller. Abandoned requests: tests/neuron/test_requests.py
and tests/cortex/test_abandon.py."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from helexa.neuron.access import model_of
from helexa.neuron.service import Neuron
from helexa.up.tiny_model import TINY_REPO_ID
from tests.support.inprocess import run_neuron


def test_model_of_reads_only_a_top_level_name() -> None:
    assert model_of(b'{"messages": [], "model": "org/m"}') == "org/m"
    assert model_of(b'{"model_id": "org/m"}') == "org/m"
    assert model_of(b'{"messages": [{"content": "{\\"model\\": \\"x\\"}"}]}') is None
    assert model_of(b"not json") is None
    assert model_of(b"[1, 2]") is None
    assert model_of(b'{"model": 3}') is None


def test_one_line_per_request(hf_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(_neuron: Neuron, client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/models")).status_code == 200
        chat = {
            "model": TINY_REPO_ID,
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}],
        }
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True})
        assert streamed.status_code == 200
        bad = await client.post("/v1/chat/completions", content=b"{not json")
        assert bad.status_code == 400
        assert (await client.get("/no/such/route")).status_code == 404

    caplog.set_level(logging.DEBUG, logger="helexa.neuron.access")
    run_neuron(
        {
            "host": "127.0.0.1",
            "harnesses": [{"name": "transformers"}],
            "harness": {"transformers": {"hf_cache": str(hf_cache)}},
        },
        TINY_REPO_ID,
        scenario,
    )
    lines = [
        (r.levelno, r.method, r.path, r.status, getattr(r, "model", None))  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "helexa.neuron.access"
    ]
    assert lines == [
        (logging.DEBUG, "GET", "/health", 200, None),
        (logging.DEBUG, "GET", "/models", 200, None),
        (logging.INFO, "POST", "/v1/chat/completions", 200, TINY_REPO_ID),
        (logging.INFO, "POST", "/v1/chat/completions", 200, TINY_REPO_ID),
        (logging.INFO, "POST", "/v1/chat/completions", 400, None),
        (logging.INFO, "GET", "/no/such/route", 404, None),
    ]
    records = [r for r in caplog.records if r.name == "helexa.neuron.access"]
    secs = [r.secs for r in records]  # type: ignore[attr-defined]
    assert all(isinstance(s, float) and s >= 0 for s in secs)
    outcomes = [r.outcome for r in records]  # type: ignore[attr-defined]
    assert outcomes == ["ok", "ok", "ok", "ok", "error", "error"]
    # The inference lines count tokens, streamed or not (no request id: none was sent).
    for chat in records[2:4]:
        assert chat.prompt_tokens > 0 and 0 <= chat.completion_tokens <= 2  # type: ignore[attr-defined]
        assert chat.request_id is None  # type: ignore[attr-defined]
    assert records[4].prompt_tokens is None  # refused before any prompt was read
