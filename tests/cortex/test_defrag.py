"""Defrag: after defrag_after_cycles loads/unloads, cortex has the neuron recycle its device
workers: a fresh process reloads the resident set."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import openai

from tests.support.fleet import start_cortex
from tests.support.procs import start_neuron, wait_for


def worker_pid(neuron_url: str) -> int:
    return httpx.get(f"{neuron_url}/health").json()["workers"][0]["pid"]


MODELS = "".join(
    f'[[models]]\nid = "helexa/tiny-{x}"\nvram_mb = 60\nmin_devices = 0\n' for x in "abc"
)


def test_defrag_recycles_the_resident_set(tmp_path: Path, fleet_cache: Path) -> None:
    neuron, neuron_url = start_neuron(
        tmp_path, "[cpu]\nmemory_mb = 130\n", hf_cache=fleet_cache, name="dn"
    )
    cortex, base, _metrics = start_cortex(
        tmp_path, {"dn": neuron_url}, MODELS, extra="[eviction]\ndefrag_after_cycles = 3\n"
    )
    try:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        first_pid = worker_pid(neuron_url)
        for model in ("helexa/tiny-a", "helexa/tiny-b", "helexa/tiny-c"):  # c evicts a
            sdk.chat.completions.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
        wait_for("a defrag", lambda: 'msg="defrag done"' in cortex.log())
        line = next(ln for ln in cortex.log().splitlines() if "msg=defrag " in ln)
        assert re.search(r"models=\S*helexa/tiny-b", line) and "helexa/tiny-c" in line
        assert "recycled=cpu" in cortex.log()
        # A fresh worker process holds the resident set again.
        recycled = next(ln for ln in neuron.log().splitlines() if "worker recycled" in ln)
        assert "helexa/tiny-b" in recycled and "helexa/tiny-c" in recycled
        for model in ("helexa/tiny-b", "helexa/tiny-c"):
            assert f'msg="model reloaded" model_id={model}' in neuron.log()
        assert worker_pid(neuron_url) != first_pid
        wait_for(
            "both models listed as loaded",
            lambda: all(
                m["loaded"]
                for m in httpx.get(f"{base}/v1/models").json()["data"]
                if m["id"] in ("helexa/tiny-b", "helexa/tiny-c")
            ),
        )
        listing = {m["id"]: m["loaded"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
        assert not listing["helexa/tiny-a"]
        answer = sdk.chat.completions.create(
            model="helexa/tiny-b", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].finish_reason in ("length", "stop")
    finally:
        cortex.stop()
        neuron.stop()
