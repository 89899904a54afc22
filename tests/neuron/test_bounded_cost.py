"""No response_format can take a neuron down: the attacks that OOM-killed or crashed a GGUF
neuron and stalled the device worker are 400s at once, and a seeded fuzz over schema shapes
gets 200 or 4xx, never a 5xx, while the other model's streams keep flowing and the neuron's
peak memory stays put. Real neuron, real SmolLM2 on both harnesses (one CPU worker)."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REAL_DENSE, REAL_GGUF
from tests.support.procs import Daemon

MSGS = [{"role": "user", "content": "Give me some JSON."}]
ATTACKS: dict[str, dict[str, Any]] = {
    "a billion items": {"type": "array", "maxItems": 1_000_000_000, "items": {"type": "integer"}},
    "a 100k string": {"type": "string", "maxLength": 100_000},
    "ten thousand values": {"enum": [f"value-{i}" for i in range(10_000)]},
    "a pattern bomb": {"type": "string", "pattern": "^((a{900}){900}){900}$"},
    "a count spelled {,n}": {"type": "string", "pattern": "^a{,100000}$"},  # crashed llama.cpp
    "11 000 branches": {"anyOf": [{"type": "string", "pattern": f"^w{i}$"} for i in range(11_000)]},
    "a hidden count": {"$defs": {"x": {"type": "string", "minLength": 10**7}}, "$ref": "#/$defs/x"},
}


@pytest.fixture(scope="module")
def base(real_neuron: tuple[Daemon, str]) -> str:
    return real_neuron[1]


def peak_rss_mb(daemon: Daemon) -> int:
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) // 1024


def ask(base: str, model: str, schema: Any, *, stream: bool = False) -> httpx.Response:
    body = {
        "model": model,
        "messages": MSGS,
        "max_tokens": 6,
        "temperature": 0,
        "stream": stream,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("model", [REAL_GGUF, REAL_DENSE])
def test_the_reported_attacks_are_400s_and_the_neuron_keeps_answering(
    base: str, model: str
) -> None:
    for name, schema in ATTACKS.items():
        response = ask(base, model, schema)
        assert response.status_code == 400, (name, response.text)
        error = response.json()["error"]
        assert error["code"] == "schema_too_complex" and "limit" in error["message"], error
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    fine = ask(base, model, {"type": "array", "maxItems": 3, "items": {"type": "integer"}})
    assert fine.status_code == 200, fine.text


class Flow:
    """Streams from one model, back to back, until stopped: the largest silence between
    two chunks and every stream's last line."""

    def __init__(self, base: str, model: str) -> None:
        self.base, self.model = base, model
        self.largest_gap = 0.0
        self.gaps: list[tuple[float, int, str]] = []
        self.endings: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": self.model, "messages": MSGS, "max_tokens": 48, "stream": True}
        while not self._stop.is_set():
            last, seen = "", time.monotonic()
            with httpx.stream(
                "POST", f"{self.base}/v1/chat/completions", json=body, timeout=60
            ) as response:
                for index, line in enumerate(response.iter_lines()):
                    now = time.monotonic()
                    if now - seen > 1:
                        self.gaps.append((round(now - seen, 2), index, line[:80]))
                    self.largest_gap = max(self.largest_gap, now - seen)
                    seen = now
                    last = line or last
            self.endings.append(last)

    def wait_for_one(self) -> None:
        deadline = time.monotonic() + 120
        while not self.endings and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> Flow:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(120)


def random_schema(rng: random.Random, depth: int = 0) -> Any:
    """A schema of a random shape: ordinary, oversized or odd, nested a few levels."""
    count = lambda: rng.choice([0, 1, 3, 40, 1000, 1001, 5000, 10**5, 10**9])  # noqa: E731
    kinds = ["string", "integer", "number", "boolean", "enum", "const", "pattern", "bad"]
    if depth < 3:
        kinds += ["array", "object", "anyOf", "ref"] * 2
    kind = rng.choice(kinds)
    if kind == "string":
        schema: dict[str, Any] = {"type": "string"}
        if rng.random() < 0.7:
            schema["maxLength"] = count()
        if rng.random() < 0.3:
            schema["minLength"] = count()
        return schema
    if kind == "integer":
        low = rng.choice([0, -(10**15), 5])
        return {"type": "integer", "minimum": low, "maximum": low + rng.choice([0, 9, 10**12])}
    if kind == "number":
        return {"type": "number", "exclusiveMinimum": rng.choice([0, 1.5])}
    if kind == "boolean":
        return {"type": rng.choice(["boolean", "null"])}
    if kind == "enum":
        size = rng.choice([1, 3, 1000, 1001, 20_000])
        return {"enum": [f"v{i}" for i in range(size)]}
    if kind == "const":
        return {"const": rng.choice(["x", 3, {"a": [1, 2]}, "y" * 5000])}
    if kind == "pattern":
        pattern = rng.choice(
            ["^[a-z]+$", r"^\d{3}$", "^(ab){999}$", "^(a{500}){500}$", "(", "^.*$"]
        )
        return {"type": "string", "pattern": pattern}
    if kind == "bad":
        return rng.choice(
            [{"type": "wat"}, {"maxItems": -1, "type": "array"}, {"minimum": 5, "maximum": 1}, 7]
        )
    if kind == "array":
        schema = {"type": "array", "items": random_schema(rng, depth + 1)}
        if rng.random() < 0.7:
            schema["maxItems"] = count()
        if rng.random() < 0.3:
            schema["minItems"] = rng.choice([0, 1, 2, count()])
        return schema
    if kind == "object":
        names = [f"f{i}" for i in range(rng.choice([0, 1, 3, 8]))]
        return {
            "type": "object",
            "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": rng.sample(names, k=len(names) // 2),
            "additionalProperties": rng.random() < 0.3,
        }
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(rng.choice([1, 2, 3]))]}
    return {"$defs": {"d": random_schema(rng, depth + 1)}, "$ref": "#/$defs/d"}


@pytest.mark.parametrize(("model", "other"), [(REAL_GGUF, REAL_DENSE), (REAL_DENSE, REAL_GGUF)])
def test_fuzzed_schemas_get_200_or_4xx_while_the_other_model_keeps_streaming(
    base: str, real_neuron: tuple[Daemon, str], model: str, other: str
) -> None:
    daemon = real_neuron[0]
    rng = random.Random(f"schemas-{model}")
    answers: dict[int, int] = {}
    with Flow(base, other) as flow:
        assert ask(base, model, {"type": "array", "items": {"type": "integer"}}).status_code == 200
        flow.wait_for_one()  # both models warm: what the peak measures is the fuzz
        peak_before = peak_rss_mb(daemon)
        for index in range(30):
            schema = random_schema(rng)
            started = time.monotonic()
            response = ask(base, model, schema, stream=index % 5 == 0)
            took = time.monotonic() - started
            described = json.dumps(schema)[:300]
            assert response.status_code == 200 or 400 <= response.status_code < 500, (
                response.status_code,
                response.text[:500],
                described,
            )
            if response.status_code != 200:
                assert response.json()["error"]["message"], described
            elif index % 5 == 0:  # a stream that started may only end well
                assert response.text.rstrip().endswith("data: [DONE]"), response.text[-500:]
            assert took < 30, (took, described)  # bounded: nothing runs away
            answers[response.status_code] = answers.get(response.status_code, 0) + 1
    assert answers.get(200) and sum(v for k, v in answers.items() if k != 200), answers
    assert flow.endings and all(end == "data: [DONE]" for end in flow.endings), flow.endings
    # The other model's worker was never held up for long: a 1 000-way alternative (the
    # limit) costs ~0.4 s a step on this CPU worker, 11 000 patterns in an anyOf (now
    # refused) cost 4 s a step and stalled it for 7; generous, for a shared machine.
    assert flow.largest_gap < 10.0, flow.gaps
    # One request cannot make the neuron allocate: the peak grew by little, if at all.
    assert peak_rss_mb(daemon) - peak_before < 400, (peak_before, peak_rss_mb(daemon))
