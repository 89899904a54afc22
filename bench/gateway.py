"""Cortex gateway overhead: the same load sent to a fast fake neuron directly and via cortex.

Starts bench/fake_neuron.py and `python -m helexa.cortex serve` (pointed at the fake) as
subprocesses, then runs each scenario in interleaved rounds (direct, cortex, direct, ...)
so that drift on a shared, noisy machine hits both targets alike.

    .venv/bin/python bench/gateway.py                       # 3 rounds x 3 s per target
    .venv/bin/python bench/gateway.py --only direct         # no cortex needed
    .venv/bin/python bench/gateway.py --rounds 5 --json /tmp/gw.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import Result, build_request, percentile, run_load

MODEL = "bench/fake"
CHAT_PATH = "/v1/chat/completions"
HERE = Path(__file__).resolve().parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from the brief.
MAX_ADDED_P50_MS = 0.3
MIN_CORTEX_RPS = 3000.0
MAX_STREAM_RATIO = 1.05


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    concurrency: int


SCENARIOS = [
    Scenario("non-stream c=1", False, 1),
    Scenario("non-stream c=32", False, 32),
    Scenario("stream c=1", True, 1),
    Scenario("stream c=16", True, 16),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process logging to a file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)

    def exited(self) -> bool:
        return self.popen.poll() is not None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.exited():
            return
        self.popen.terminate()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def cpu_s(self) -> float:
        """User+system CPU of the process and its descendants (cortex may fork workers)."""
        total = 0
        todo = [self.popen.pid]
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
                todo += [
                    int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                ]
            except (OSError, IndexError, ValueError):
                continue
        return total / _CLK_TCK


class BenchError(RuntimeError):
    pass


def wait_ready(proc: Proc, url: str, ready: Any, timeout_s: float) -> None:
    """Poll `url` until `ready(json)` holds; fail early if the process dies."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.exited():
                raise BenchError(
                    f"{proc.name} exited with {proc.popen.returncode} before it was ready; "
                    f"log {proc.log}:\n{proc.log_tail()}"
                )
            try:
                r = client.get(url)
                if r.status_code == 200 and ready(r.json()):
                    return
                last = f"HTTP {r.status_code}: {r.text[:300]}"
            except (httpx.HTTPError, ValueError) as e:
                last = repr(e)
            time.sleep(0.1)
    raise BenchError(
        f"{proc.name} not ready after {timeout_s:.0f} s at {url} (last: {last}); "
        f"log {proc.log}:\n{proc.log_tail()}"
    )


def _cortex_lists_model(body: Any) -> bool:
    items = body.get("data", []) if isinstance(body, dict) else body
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or item.get("id") != MODEL:
            continue
        # "loaded" at the top of the entry, or one level down in an extension object.
        if item.get("loaded") is True:
            return True
        if any(isinstance(v, dict) and v.get("loaded") is True for v in item.values()):
            return True
    return False


def start_fake(workdir: Path, chunks: int, interval_ms: float) -> tuple[Proc, int]:
    port = free_port()
    argv = [sys.executable, str(HERE / "fake_neuron.py"), "--port", str(port)]
    argv += ["--model", MODEL, "--chunks", str(chunks), "--chunk-interval-ms", str(interval_ms)]
    proc = Proc("fake neuron", argv, workdir / "fake_neuron.log", workdir)
    wait_ready(proc, f"http://127.0.0.1:{port}/health", lambda _: True, 10.0)
    return proc, port


def start_cortex(workdir: Path, fake_port: int) -> tuple[Proc, int]:
    try:
        found = importlib.util.find_spec("helexa.cortex.__main__") is not None
    except ImportError:
        found = False
    if not found:
        raise BenchError(
            "helexa.cortex is not importable yet (no helexa/cortex/__main__.py); "
            "run with --only direct until the gateway exists"
        )
    port, metrics_port = free_port(), free_port()
    (workdir / "cortex.toml").write_text(
        'models_config = "models.toml"\n'
        "[gateway]\n"
        f'listen = "127.0.0.1:{port}"\n'
        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        "[[neurons]]\n"
        'name = "fake"\n'
        f'endpoint = "http://127.0.0.1:{fake_port}"\n'
    )
    (workdir / "models.toml").write_text(
        f'[[models]]\nid = "{MODEL}"\nharness = "transformers"\nvram_mb = 1000\n'
    )
    argv = [sys.executable, "-m", "helexa.cortex", "serve", "--config"]
    proc = Proc("cortex", [*argv, str(workdir / "cortex.toml")], workdir / "cortex.log", workdir)
    # Cortex polls neurons every ~2 s, so the model shows up as loaded after a poll or two.
    wait_ready(proc, f"http://127.0.0.1:{port}/v1/models", _cortex_lists_model, 30.0)
    return proc, port


@dataclass
class Run:
    """One (scenario, target, round) plus the CPU each process spent on it."""

    result: Result
    client_cpu_s: float
    fake_cpu_s: float
    cortex_cpu_s: float


async def one_run(
    sc: Scenario,
    port: int,
    procs: dict[str, Proc],
    duration_s: float,
    max_requests: int,
) -> Run:
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    if sc.stream:
        body["stream"] = True
    req = build_request("127.0.0.1", port, CHAT_PATH, body)
    cpu0 = (time.process_time(), procs["fake"].cpu_s(), _cpu(procs.get("cortex")))
    res = await run_load(
        "127.0.0.1",
        port,
        req,
        stream=sc.stream,
        concurrency=sc.concurrency,
        duration_s=duration_s,
        max_requests=max_requests,
    )
    cpu1 = (time.process_time(), procs["fake"].cpu_s(), _cpu(procs.get("cortex")))
    return Run(res, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], cpu1[2] - cpu0[2])


def _cpu(proc: Proc | None) -> float:
    return proc.cpu_s() if proc is not None else 0.0


def summarize(runs: list[Run], stream: bool) -> dict[str, Any]:
    total = Result()
    for r in runs:
        total.merge(r.result)
    ok = max(total.ok, 1)
    rps = [r.result.ok / (r.result.elapsed_ns / 1e9) for r in runs if r.result.elapsed_ns]
    ms = 1e6
    out: dict[str, Any] = {
        "requests": total.ok,
        "errors": total.errors,
        "error_kinds": total.error_kinds,
        "p50_ms": percentile(total.latency_ns, 50) / ms,
        "p99_ms": percentile(total.latency_ns, 99) / ms,
        # Median over rounds: one noisy round on a shared box doesn't move it.
        "rps": statistics.median(rps) if rps else 0.0,
        "rps_rounds": rps,
        "client_cpu_us_per_req": sum(r.client_cpu_s for r in runs) / ok * 1e6,
        "fake_cpu_us_per_req": sum(r.fake_cpu_s for r in runs) / ok * 1e6,
        "cortex_cpu_us_per_req": sum(r.cortex_cpu_s for r in runs) / ok * 1e6,
    }
    if stream:
        out["first_p50_ms"] = percentile(total.first_ns, 50) / ms
    return out


async def bench(
    args: argparse.Namespace, targets: dict[str, int], procs: dict[str, Proc]
) -> dict[str, dict[str, dict[str, Any]]]:
    duration = args.duration if args.duration is not None else (600.0 if args.requests else 3.0)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sc in SCENARIOS:
        runs: dict[str, list[Run]] = {t: [] for t in targets}
        for port in targets.values():  # warm connections, caches and the upstream pool
            await one_run(sc, port, procs, args.warmup, 0)
        for rnd in range(args.rounds):
            # Alternate which target goes first so neither always follows the other.
            order = list(targets.items()) if rnd % 2 == 0 else list(reversed(targets.items()))
            for t, port in order:
                runs[t].append(await one_run(sc, port, procs, duration, args.requests))
        out[sc.name] = {t: summarize(r, sc.stream) for t, r in runs.items()}
        print(f"  done: {sc.name}", file=sys.stderr, flush=True)
    return out


def check_targets(res: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The brief's targets: throughput needs cortex measured, the comparisons need both."""
    checks: list[dict[str, Any]] = []
    errors = sum(t["errors"] for sc in res.values() for t in sc.values())
    checks.append({"name": "errors (all runs)", "value": errors, "target": "== 0"})
    checks[-1]["pass"] = errors == 0
    measured = res[SCENARIOS[0].name]
    if "cortex" not in measured:
        return checks
    rps = res["non-stream c=32"]["cortex"]["rps"]
    checks.append(
        {
            "name": "cortex throughput, non-stream c=32 (req/s)",
            "value": rps,
            "target": f">= {MIN_CORTEX_RPS:.0f}",
            "pass": rps >= MIN_CORTEX_RPS,
        }
    )
    if "direct" not in measured:
        return checks

    def both(name: str, key: str) -> tuple[float, float]:
        return res[name]["direct"][key], res[name]["cortex"][key]

    d, c = both("non-stream c=1", "p50_ms")
    checks.append(
        {
            "name": "added latency p50, non-stream c=1 (ms)",
            "value": c - d,
            "target": f"<= +{MAX_ADDED_P50_MS}",
            "pass": c - d <= MAX_ADDED_P50_MS,
        }
    )
    for name, gated in (("stream c=1", False), ("stream c=16", True)):
        d, c = both(name, "p50_ms")
        checks.append(
            {
                "name": f"last-chunk p50 ratio cortex/direct, {name}",
                "value": c / d,
                "target": f"<= {MAX_STREAM_RATIO}" if gated else "(info)",
                "pass": c / d <= MAX_STREAM_RATIO if gated else None,
            }
        )
    return checks


def print_report(res: dict[str, dict[str, dict[str, Any]]], checks: list[dict[str, Any]]) -> None:
    head = (
        f"{'scenario':<16} {'target':<7} {'ok':>7} {'err':>4} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'first p50':>9} {'req/s':>8} {'cpu us/req: client':>18} {'fake':>6} {'cortex':>7}"
    )
    print(head)
    print("-" * len(head))
    for name, per in res.items():
        for t, s in per.items():
            first = f"{s['first_p50_ms']:9.2f}" if "first_p50_ms" in s else f"{'':9}"
            cortex = f"{s['cortex_cpu_us_per_req']:7.0f}" if t == "cortex" else f"{'':7}"
            print(
                f"{name:<16} {t:<7} {s['requests']:>7} {s['errors']:>4} {s['p50_ms']:8.3f} "
                f"{s['p99_ms']:8.3f} {first} {s['rps']:8.0f} "
                f"{s['client_cpu_us_per_req']:18.0f} {s['fake_cpu_us_per_req']:6.0f} {cortex}"
            )
            if s["error_kinds"]:
                print(f"{'':16} errors: {s['error_kinds']}")
    print()
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: ""}[c["pass"]]
        value = c["value"] if isinstance(c["value"], int) else f"{c['value']:.3f}"
        print(f"{c['name']:<46} {value:>10}  target {c['target']:<8} {verdict}")
    if len(checks) < 5:
        print("(comparison targets skipped: only one target measured)")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=0, help="requests per run (default: timed)")
    ap.add_argument("--duration", type=float, help="seconds per run (default 3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds per target per scenario")
    ap.add_argument("--only", choices=["direct", "cortex"])
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--chunk-interval-ms", type=float, default=5.0)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()

    procs: dict[str, Proc] = {}
    with tempfile.TemporaryDirectory(prefix="helexa-gw-bench-") as tmp:
        workdir = Path(tmp)
        try:
            procs["fake"], fake_port = start_fake(workdir, args.chunks, args.chunk_interval_ms)
            targets: dict[str, int] = {}
            if args.only != "cortex":
                targets["direct"] = fake_port
            if args.only != "direct":
                procs["cortex"], targets["cortex"] = start_cortex(workdir, fake_port)
            res = uvloop.run(bench(args, targets, procs))
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            for p in reversed(procs.values()):
                p.stop()
    checks = check_targets(res)
    print_report(res, checks)
    if args.json:
        doc = {"config": {k: str(v) for k, v in vars(args).items()}, "scenarios": res}
        doc["targets"] = checks
        args.json.write_text(json.dumps(doc, indent=2))
    return 0 if all(c["pass"] is not False for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
