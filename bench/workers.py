"""The neuron with a worker process per device against the same neuron with its engines in
its own process (``[workers] isolate = false``, the layout before), side by side.

Two real neurons serve SmolLM2-135M-Instruct's GGUF (llamacpp harness only, same threads,
KV cells and slots) on loopback; they are measured one at a time, the order swapped every
round. Figures, per layout (medians over rounds):

- short-prompt TTFT: a ~40-token prompt with a fresh nonce (nothing cached), streamed;
- single-stream decode tok/s (128 tokens) and the aggregate of 4 streams (64 tokens each);
- the main process's CPU per engine step during that single stream (its utime+stime over
  the engine's ``batch.steps``): everything the HTTP side spends per step, IPC included;
  and, isolated, output frames per step;
- ``/health`` latency (p50, p99, max) while the 4 streams decode;
- RSS of each neuron's process tree after the run.

Then, isolated only, crash trials: a stream is running, its worker gets SIGKILL; the time
until the stream's error event, until the worker is ready again and until the model is
reloaded; and the worker's start-up (interpreter, imports, engine set-up: ``startup_s``).

    .venv/bin/python -m bench.workers [--rounds 3 --crashes 3 --threads 2]

No timing is asserted anywhere: this is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.neuron_engines import concurrent_chat, nonce, rss, stream_chat
from helexa.up.demo_model import demo_gguf
from tests.support.procs import Daemon, start_neuron

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "models"
MODEL = "SmolLM2-135M-Instruct-GGUF"


def config(isolate: bool, threads: int) -> str:
    return f"""
model_dirs = ["{CACHE}"]
harnesses = [{{name = "llamacpp"}}]
[harness.llamacpp]
context_tokens = 8192
slots = 8
threads = {threads}
[admission]
max_concurrent = 8
[workers]
isolate = {str(isolate).lower()}
[[default_models]]
model_id = "{MODEL}"
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_rss_mb(daemon: Daemon, base: str) -> float:
    assert daemon.proc is not None
    pids = [daemon.proc.pid] + [w["pid"] for w in health(base)["workers"] if w["pid"]]
    return sum(rss(pid)["VmRSS"] for pid in pids)


def health(base: str) -> dict[str, Any]:
    return httpx.get(f"{base}/health", timeout=30).json()


def steps(base: str) -> int:
    return (health(base)["models"][MODEL].get("batch") or {}).get("steps", 0)


def frames(base: str) -> int:
    return sum(w["output_frames"] for w in health(base)["workers"])


def messages(words: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"[{nonce()}] {words}"}]


def round_of(daemon: Daemon, base: str) -> dict[str, float]:
    assert daemon.proc is not None
    main = daemon.proc.pid
    out: dict[str, float] = {}
    with httpx.Client() as client:
        ttfts = [stream_chat(client, base, MODEL, messages("Say hello."), 4).ttft for _ in range(5)]
        out["ttft_short_ms"] = statistics.median(ttfts) * 1000
        cpu0, steps0, frames0 = cpu_seconds(main), steps(base), frames(base)
        single = stream_chat(
            client, base, MODEL, messages("Write a long story about a lighthouse."), 128
        )
        cpu1, steps1, frames1 = cpu_seconds(main), steps(base), frames(base)
    out["decode_tok_s"] = single.decode_rate
    taken = max(steps1 - steps0, 1)
    out["main_cpu_us_per_step"] = (cpu1 - cpu0) / taken * 1e6
    out["frames_per_step"] = (frames1 - frames0) / taken
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                sent = time.perf_counter()
                client.get(f"{base}/health")
                latencies.append(time.perf_counter() - sent)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    prompts = [messages(f"Tell story number {i} about a fox.") for i in range(4)]
    out["aggregate4_tok_s"], _ = concurrent_chat(base, MODEL, prompts, 64)
    stop.set()
    poller.join()
    latencies.sort()
    out["health_p50_ms"] = statistics.median(latencies) * 1000
    out["health_p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000
    out["health_max_ms"] = latencies[-1] * 1000
    return out


def crash_trial(base: str) -> dict[str, float]:
    pid = next(w["pid"] for w in health(base)["workers"] if w["device"] == "cpu")
    body = {
        "model": MODEL,
        "messages": messages("Write a very long story about a cat."),
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if '"content"' in line:
                break
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        last = ""
        for line in lines:
            if line.startswith("data:"):
                last = line
        errored = time.perf_counter() - killed
    assert "engine_crashed" in last, last
    ready = reloaded = 0.0
    while not reloaded:
        now = time.perf_counter() - killed
        worker = next(w for w in health(base)["workers"] if w["device"] == "cpu")
        if not ready and worker["state"] == "ready" and worker["pid"] != pid:
            ready = now
        listing = httpx.get(f"{base}/models", timeout=30).json()
        if ready and any(m["id"] == MODEL and m["status"] == "loaded" for m in listing):
            reloaded = now
        time.sleep(0.02)
    startup = next(w for w in health(base)["workers"] if w["device"] == "cpu")["startup_s"]
    return {
        "error_after_ms": errored * 1000,
        "worker_ready_after_s": ready,
        "reloaded_after_s": reloaded,
        "startup_s": startup,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--crashes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/helexa-bench-workers"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    demo_gguf(CACHE)
    layouts = {}
    for name, isolate in (("isolated", True), ("in-process", False)):
        layouts[name] = start_neuron(
            args.work_dir / name,
            config(isolate, args.threads),
            hf_cache=args.work_dir / "hf",
            name=name,
        )
    try:
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in layouts}
        order = list(layouts)
        for index in range(args.rounds):
            for name in order if index % 2 == 0 else order[::-1]:
                daemon, base = layouts[name]
                figures = round_of(daemon, base)
                rounds[name].append(figures)
                print(json.dumps({"round": index + 1, "layout": name, **figures}), flush=True)
        summary: dict[str, Any] = {}
        for name, runs in rounds.items():
            summary[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            summary[name]["rss_tree_mb"] = tree_rss_mb(*layouts[name])
        iso, inp = summary["isolated"], summary["in-process"]
        summary["ratio"] = {
            k: iso[k] / inp[k] for k in iso if inp.get(k) and k != "frames_per_step"
        }
        _, base = layouts["isolated"]
        trials = [crash_trial(base) for _ in range(args.crashes)]
        for trial in trials:
            print(json.dumps({"crash": trial}), flush=True)
        summary["crash"] = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
        summary["crash"]["error_after_max_ms"] = max(t["error_after_ms"] for t in trials)
        print(json.dumps(summary, indent=1))
        if args.json:
            args.json.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=1))
    finally:
        for daemon, _ in layouts.values():
            daemon.stop()


if __name__ == "__main__":
    main()
