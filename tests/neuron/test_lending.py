"""A neuron lending a device (``/rpc/lend``, ``/rpc/release``) and refusing what it must:
lent memory is taken for its own loads too; loans that never see their borrower end; bad
requests get clear 4xx; a pooled load whose donor cannot be reached fails cleanly, leaving
no worker behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REAL_CACHE, REAL_GGUF
from tests.support.procs import Daemon, free_port, start_neuron, wait_for

CONFIG = f"""
model_dirs = ["{REAL_CACHE}"]
harnesses = [{{name = "llamacpp"}}]
[cpu]
memory_mb = 200
[harness.llamacpp]
context_tokens = 2048
[rpc]
ports = [50300, 50309]
connect_timeout_s = 2
idle_grace_s = 1
"""


@pytest.fixture(scope="module")
def lender(
    tmp_path_factory: pytest.TempPathFactory, hf_cache: Path, real_models: tuple[Path, Path]
) -> Iterator[tuple[Daemon, str]]:
    daemon, base = start_neuron(tmp_path_factory.mktemp("lending"), CONFIG, hf_cache=hf_cache)
    yield daemon, base
    daemon.stop()


def lend(base: str, mb: int, **more: object) -> httpx.Response:
    body = {"mb": mb, "borrower": "127.0.0.1", "model_id": REAL_GGUF, **more}
    return httpx.post(f"{base}/rpc/lend", json=body, timeout=60)


def health(base: str) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"{base}/health", timeout=5).json()


def test_lent_memory_is_taken_for_the_lenders_own_loads(lender: tuple[Daemon, str]) -> None:
    _daemon, base = lender
    loan = lend(base, 150)
    assert loan.status_code == 200, loan.text
    assert health(base)["cpu"] == {"memory_used_mb": 0, "memory_free_mb": 50, "lent_mb": 150}
    refused = httpx.post(f"{base}/models/load", json={"model_id": REAL_GGUF}, timeout=60)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "insufficient_memory"
    more = lend(base, 100)
    assert more.status_code == 409 and "50 MB free" in more.json()["error"]["message"]

    released = httpx.post(f"{base}/rpc/release", json={"loan_id": loan.json()["id"]}, timeout=30)
    assert released.status_code == 200
    assert health(base)["loans"] == []
    loaded = httpx.post(f"{base}/models/load", json={"model_id": REAL_GGUF}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    httpx.post(f"{base}/models/unload", json={"model_id": REAL_GGUF}, timeout=60)


def test_a_loan_whose_borrower_never_connects_ends(lender: tuple[Daemon, str]) -> None:
    _daemon, base = lender
    loan = lend(base, 20).json()
    assert health(base)["loans"][0]["state"] == "waiting"
    wait_for("the loan to end", lambda: not health(base)["loans"], timeout=15)
    assert health(base)["cpu"]["lent_mb"] == 0
    assert "did not connect" in _daemon.log() and loan["id"] in _daemon.log()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"mb": 0}, 400, None),
        ({"mb": 10, "borrower": ""}, 400, None),
        ({"mb": 10, "allow": ["0.0.0.0"]}, 400, None),
        ({"mb": 10, "device": 3}, 400, "no_such_device"),
        ({"mb": 10, "borrower": "no-such-host.invalid"}, 400, None),
    ],
)
def test_bad_loans_are_refused(
    lender: tuple[Daemon, str], body: dict, status: int, code: str | None
) -> None:  # type: ignore[type-arg]
    _daemon, base = lender
    full = {"borrower": "127.0.0.1", "model_id": REAL_GGUF, **body}
    response = httpx.post(f"{base}/rpc/lend", json=full, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    assert health(base)["loans"] == []


def test_releasing_an_unknown_loan_is_404(lender: tuple[Daemon, str]) -> None:
    _daemon, base = lender
    response = httpx.post(f"{base}/rpc/release", json={"loan_id": "nope"}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "loan_not_found"


def test_a_pooled_load_whose_donor_is_unreachable_fails_cleanly(
    lender: tuple[Daemon, str],
) -> None:
    _daemon, base = lender
    nobody = f"127.0.0.1:{free_port()}"
    spec = {"model_id": REAL_GGUF, "devices": [], "rpc": [{"endpoint": nobody, "mb": 80}]}
    response = httpx.post(f"{base}/models/load", json=spec, timeout=60)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "donor_unreachable"
    assert nobody in response.json()["error"]["message"]
    h = health(base)
    assert REAL_GGUF not in h["models"]
    assert [w["device"] for w in h["workers"]] == ["cpu"]  # no pooled worker left behind


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"model_id": "org/dense-model", "harness": "transformers"}, "GGUF"),
        ({"model_id": REAL_GGUF, "devices": [0, 1]}, "one local device"),
        ({"model_id": REAL_GGUF, "rpc": [{"endpoint": "http://x:1", "mb": 1}]}, None),
        ({"model_id": REAL_GGUF, "rpc": [{"endpoint": "127.0.0.1:1", "mb": 0}]}, None),
    ],
)
def test_pooled_specs_that_cannot_work_are_400(
    lender: tuple[Daemon, str], spec: dict, where: str | None
) -> None:  # type: ignore[type-arg]
    _daemon, base = lender
    body = {"rpc": [{"endpoint": "127.0.0.1:1", "mb": 10}], **spec}
    response = httpx.post(f"{base}/models/load", json=body, timeout=30)
    assert response.status_code == 400, response.text
    if where is not None:
        assert where in response.json()["error"]["message"]
