"""Cortex gateway overhead: the same load sent to a fast fake neuron directly and via cortex.

Starts bench/fake_neuron.py and `python -m helexa.cortex serve` (pointed at the fake) as
subprocesses, then runs each scenario in interleaved rounds (direct, cortex, direct, ...)
so that drift on a shared, noisy machine hits both targets alike.

Scenario groups (`--scenarios`, a comma list of groups or scenario keys):
  proxy     direct vs cortex, OpenAI chat completions (issue #3)
  messages  both through cortex: /v1/chat/completions vs Anthropic /v1/messages (issue #4)

    .venv/bin/python bench/gateway.py                       # 3 rounds x 3 s per target
    .venv/bin/python bench/gateway.py --only direct         # no cortex needed
    .venv/bin/python bench/gateway.py --scenarios messages  # just the translation cost
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

from bench.loadgen import (
    ANTHROPIC_JSON,
    ANTHROPIC_STREAM,
    OPENAI_JSON,
    OPENAI_STREAM,
    Format,
    Result,
    build_request,
    percentile,
    run_load,
)

MODEL = "bench/fake"
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
HERE = Path(__file__).resolve().parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from the brief.
MAX_ADDED_P50_MS = 0.3
MIN_CORTEX_RPS = 3000.0
MAX_STREAM_RATIO = 1.05
MAX_MESSAGES_RATIO = 1.10  # issue #4: /v1/messages vs /v1/chat/completions, stream c=16


@dataclass(frozen=True)
class Variant:
    """One side of a comparison: which server, which route, which body, how to check it."""

    label: str  # column in the report: direct, cortex, chat, messages
    server: str  # "fake" or "cortex"
    path: str
    anthropic: bool  # Anthropic Messages body and response, else OpenAI chat

    def body(self, stream: bool) -> dict[str, object]:
        body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        if self.anthropic:
            body["max_tokens"] = 64  # required by the Messages API
        if stream:
            body["stream"] = True
        return body

    def fmt(self, stream: bool) -> Format:
        if self.anthropic:
            return ANTHROPIC_STREAM if stream else ANTHROPIC_JSON
        return OPENAI_STREAM if stream else OPENAI_JSON


DIRECT = Variant("direct", "fake", CHAT_PATH, False)
CORTEX = Variant("cortex", "cortex", CHAT_PATH, False)
CHAT = Variant("chat", "cortex", CHAT_PATH, False)
MESSAGES = Variant("messages", "cortex", MESSAGES_PATH, True)


@dataclass(frozen=True)
class Scenario:
    key: str  # for --scenarios
    group: str
    name: str
    stream: bool
    concurrency: int
    variants: tuple[Variant, ...]


SCENARIOS = [
    Scenario("nonstream-c1", "proxy", "non-stream c=1", False, 1, (DIRECT, CORTEX)),
    Scenario("nonstream-c32", "proxy", "non-stream c=32", False, 32, (DIRECT, CORTEX)),
    Scenario("stream-c1", "proxy", "stream c=1", True, 1, (DIRECT, CORTEX)),
    Scenario("stream-c16", "proxy", "stream c=16", True, 16, (DIRECT, CORTEX)),
    Scenario("messages-nonstream-c1", "messages", "msg non-stream c=1", False, 1, (CHAT, MESSAGES)),
    Scenario("messages-stream-c16", "messages", "msg stream c=16", True, 16, (CHAT, MESSAGES)),
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
    v: Variant,
    port: int,
    procs: dict[str, Proc],
    duration_s: float,
    max_requests: int,
) -> Run:
    req = build_request("127.0.0.1", port, v.path, v.body(sc.stream))
    cpu0 = (time.process_time(), procs["fake"].cpu_s(), _cpu(procs.get("cortex")))
    res = await run_load(
        "127.0.0.1",
        port,
        req,
        fmt=v.fmt(sc.stream),
        concurrency=sc.concurrency,
        duration_s=duration_s,
        max_requests=max_requests,
    )
    cpu1 = (time.process_time(), procs["fake"].cpu_s(), _cpu(procs.get("cortex")))
    return Run(res, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1], cpu1[2] - cpu0[2])


def _cpu(proc: Proc | None) -> float:
    return proc.cpu_s() if proc is not None else 0.0


def summarize(runs: list[Run], stream: bool, via_cortex: bool) -> dict[str, Any]:
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
        "error_samples": total.error_samples,
        "via_cortex": via_cortex,
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
    args: argparse.Namespace,
    scenarios: list[Scenario],
    ports: dict[str, int],
    procs: dict[str, Proc],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per scenario, the variants whose server runs (`ports`), in interleaved rounds."""
    duration = args.duration if args.duration is not None else (600.0 if args.requests else 3.0)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sc in scenarios:
        variants = [v for v in sc.variants if v.server in ports]
        if not variants:
            continue
        runs: dict[str, list[Run]] = {v.label: [] for v in variants}
        for v in variants:  # warm connections, caches and the upstream pool
            await one_run(sc, v, ports[v.server], procs, args.warmup, 0)
        for rnd in range(args.rounds):
            # Alternate which variant goes first so neither always follows the other.
            order = variants if rnd % 2 == 0 else variants[::-1]
            for v in order:
                run = await one_run(sc, v, ports[v.server], procs, duration, args.requests)
                runs[v.label].append(run)
        out[sc.name] = {
            v.label: summarize(runs[v.label], sc.stream, v.server == "cortex") for v in variants
        }
        print(f"  done: {sc.name}", file=sys.stderr, flush=True)
    return out


def check_targets(res: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The briefs' targets, each where the scenarios and variants it compares were measured."""
    checks: list[dict[str, Any]] = []
    errors = sum(t["errors"] for sc in res.values() for t in sc.values())
    checks.append({"name": "errors (all runs)", "value": errors, "target": "== 0"})
    checks[-1]["pass"] = errors == 0

    def get(name: str, label: str, key: str) -> float | None:
        return res.get(name, {}).get(label, {}).get(key)

    def add(name: str, value: float, target: str, ok: bool | None) -> None:
        checks.append({"name": name, "value": value, "target": target, "pass": ok})

    rps = get("non-stream c=32", "cortex", "rps")
    if rps is not None:
        add(
            "cortex throughput, non-stream c=32 (req/s)",
            rps,
            f">= {MIN_CORTEX_RPS:.0f}",
            rps >= MIN_CORTEX_RPS,
        )
    d, c = get("non-stream c=1", "direct", "p50_ms"), get("non-stream c=1", "cortex", "p50_ms")
    if d is not None and c is not None:
        add(
            "added latency p50, non-stream c=1 (ms)",
            c - d,
            f"<= +{MAX_ADDED_P50_MS}",
            c - d <= MAX_ADDED_P50_MS,
        )
    for name, gated in (("stream c=1", False), ("stream c=16", True)):
        d, c = get(name, "direct", "p50_ms"), get(name, "cortex", "p50_ms")
        if d is not None and c is not None:
            add(
                f"last-chunk p50 ratio cortex/direct, {name}",
                c / d,
                f"<= {MAX_STREAM_RATIO}" if gated else "(info)",
                c / d <= MAX_STREAM_RATIO if gated else None,
            )
    # Issue #4: both through cortex, Anthropic Messages vs OpenAI chat completions.
    ch, m = get("msg stream c=16", "chat", "p50_ms"), get("msg stream c=16", "messages", "p50_ms")
    if ch is not None and m is not None:
        add(
            "last-event p50 ratio messages/chat, stream c=16",
            m / ch,
            f"<= {MAX_MESSAGES_RATIO}",
            m / ch <= MAX_MESSAGES_RATIO,
        )
    ch = get("msg stream c=16", "chat", "first_p50_ms")
    m = get("msg stream c=16", "messages", "first_p50_ms")
    if ch is not None and m is not None:
        add("first-content p50 added, messages-chat, stream c=16 (ms)", m - ch, "(info)", None)
    ch = get("msg non-stream c=1", "chat", "p50_ms")
    m = get("msg non-stream c=1", "messages", "p50_ms")
    if ch is not None and m is not None:
        add("added latency p50, messages-chat, non-stream c=1 (ms)", m - ch, "(info)", None)
    return checks


def print_report(res: dict[str, dict[str, dict[str, Any]]], checks: list[dict[str, Any]]) -> None:
    head = (
        f"{'scenario':<18} {'target':<8} {'ok':>7} {'err':>4} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'first p50':>9} {'req/s':>8} {'cpu us/req: client':>18} {'fake':>6} {'cortex':>7}"
    )
    print(head)
    print("-" * len(head))
    for name, per in res.items():
        for t, s in per.items():
            first = f"{s['first_p50_ms']:9.2f}" if "first_p50_ms" in s else f"{'':9}"
            cortex = f"{s['cortex_cpu_us_per_req']:7.0f}" if s["via_cortex"] else f"{'':7}"
            print(
                f"{name:<18} {t:<8} {s['requests']:>7} {s['errors']:>4} {s['p50_ms']:8.3f} "
                f"{s['p99_ms']:8.3f} {first} {s['rps']:8.0f} "
                f"{s['client_cpu_us_per_req']:18.0f} {s['fake_cpu_us_per_req']:6.0f} {cortex}"
            )
            if s["error_kinds"]:
                print(f"{'':18} errors: {s['error_kinds']}")
                for sample in s["error_samples"]:
                    print(f"{'':18}   e.g. {sample!r}")
    print()
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: ""}[c["pass"]]
        value = c["value"] if isinstance(c["value"], int) else f"{c['value']:.3f}"
        print(f"{c['name']:<56} {value:>10}  target {c['target']:<8} {verdict}")


def select_scenarios(spec: str) -> list[Scenario]:
    """`all`, or a comma list of groups (proxy, messages) and scenario keys."""
    wanted = {w.strip() for w in spec.split(",") if w.strip()}
    known = {"all"} | {s.group for s in SCENARIOS} | {s.key for s in SCENARIOS}
    if not wanted or wanted - known:
        raise SystemExit(
            f"--scenarios: unknown {sorted(wanted - known) or spec!r}; "
            f"choose from {', '.join(sorted(known))}"
        )
    return [s for s in SCENARIOS if wanted & {"all", s.group, s.key}]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="scenarios: "
        + ", ".join(f"{s.key} ({s.group})" for s in SCENARIOS)
        + "; groups: proxy, messages",
    )
    ap.add_argument("--requests", type=int, default=0, help="requests per run (default: timed)")
    ap.add_argument("--duration", type=float, help="seconds per run (default 3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds per target per scenario")
    ap.add_argument("--only", choices=["direct", "cortex"])
    ap.add_argument(
        "--scenarios",
        default="all",
        help="comma list of groups (proxy, messages) or scenario keys (default: all)",
    )
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--chunk-interval-ms", type=float, default=5.0)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()
    scenarios = select_scenarios(args.scenarios)
    need_direct = any(v.server == "fake" for s in scenarios for v in s.variants)
    need_cortex = any(v.server == "cortex" for s in scenarios for v in s.variants)

    procs: dict[str, Proc] = {}
    with tempfile.TemporaryDirectory(prefix="helexa-gw-bench-") as tmp:
        workdir = Path(tmp)
        try:
            procs["fake"], fake_port = start_fake(workdir, args.chunks, args.chunk_interval_ms)
            ports: dict[str, int] = {}
            if args.only != "cortex" and need_direct:
                ports["fake"] = fake_port
            if args.only != "direct" and need_cortex:
                procs["cortex"], ports["cortex"] = start_cortex(workdir, fake_port)
            res = uvloop.run(bench(args, scenarios, ports, procs))
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        finally:
            for p in reversed(procs.values()):
                p.stop()
    checks = check_targets(res)
    print_report(res, checks)
    skipped = [s.name for s in scenarios if s.name not in res]
    if skipped:
        print(f"(not run, their server was left out by --only: {', '.join(skipped)})")
    if args.json:
        doc = {"config": {k: str(v) for k, v in vars(args).items()}, "scenarios": res}
        doc["targets"] = checks
        args.json.write_text(json.dumps(doc, indent=2))
    return 0 if all(c["pass"] is not False for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
