"""Defrag: after defrag_after_cycles loads/unloads, cortex recycles a neuron's resident set."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai

from tests.support.fleet import start_cortex
from tests.support.procs import start_neuron

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
        for model in ("helexa/tiny-a", "helexa/tiny-b", "helexa/tiny-c"):  # c evicts a
            sdk.chat.completions.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
        deadline = time.monotonic() + 30
        while "msg=defrag " not in cortex.log():
            assert time.monotonic() < deadline, cortex.log()
            time.sleep(0.1)
        line = next(ln for ln in cortex.log().splitlines() if "msg=defrag " in ln)
        assert re.search(r"models=\S*helexa/tiny-b", line) and "helexa/tiny-c" in line
        # The resident set is back after the recycle: unloaded and loaded again.
        deadline = time.monotonic() + 30
        while neuron.log().count("msg=load model_id=helexa/tiny-c ") < 2:
            assert time.monotonic() < deadline, neuron.log()
            time.sleep(0.1)
        while True:
            listing = {m["id"]: m["loaded"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
            if listing["helexa/tiny-b"] and listing["helexa/tiny-c"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert not listing["helexa/tiny-a"]
        assert "msg=unloaded model_id=helexa/tiny-b" in neuron.log()
    finally:
        cortex.stop()
        neuron.stop()
