"""The neuron against llama.cpp's own ``llama-server`` on the same GGUF.

Both run as real processes on loopback, from the same llama.cpp source and build arguments
(``bench/peers/build-llama-server.sh`` builds llama-server from the sdist of the installed
llama-cpp-python), with the same GGUF, threads, KV cells (one unified KV shared by every
sequence), slots, and prompt chunk / batch size. Both stay up for the whole run but never
work at the same time: every figure is measured on one, then on the other, the order
swapped each round (A B, B A, ...); before each measurement the bench waits until every
other process (the idle peer included) uses < --quiet cores, and records what they used.

Figures, per server, over plain HTTP (``/v1/chat/completions``, streaming, greedy):

- single-stream decode tok/s: (completion tokens - 1) / (first content chunk -> last);
- aggregate tok/s of 4 and 8 concurrent streams: every completion token / (send -> last);
- cold TTFT of a ~1500-token prompt, distinct each time (a nonce opens the system prompt,
  so nothing of it is cached);
- second-turn TTFT: a ~1500-token conversation's turn 1, then the same messages plus the
  assistant's reply and a new user message; both servers may reuse turn 1's KV;
- RSS of each server's process tree after load and after the run (and its peak).

Ratios are neuron / llama-server of the medians (of the rounds where others stayed quiet).

    bench/peers/build-llama-server.sh          # once: prints the binary's path
    .venv/bin/python -m bench.peers.llama_server --gguf PATH.gguf [--threads N --ctx N \\
        --slots N --rounds N]

llama-server runs with its own defaults otherwise. One of them matters here: its prompt cache
in host memory (``--cache-ram``, 8 GiB) with ``--cache-idle-slots``: when a task starts,
every idle slot is copied to host memory and cleared from the unified KV, so a decode attends
over its own cells only, and a later hit copies the slot back. The neuron keeps finished
conversations in the KV cells themselves. ``--llama-args="--cache-ram 0"`` turns that cache
off, so that both keep them in the KV (the same design side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import llama_cpp

from bench.neuron_engines import (
    PARAGRAPHS,
    CpuWatch,
    Series,
    Stream,
    concurrent_chat,
    greedy_stream_body,
    nonce,
)
from tests.support.procs import Daemon, free_port, start_neuron

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
PHASES = ("single", "streams", "cold", "turn2")
# Asks that keep a small instruct model writing past the token budget (greedy stops on EOS
# otherwise, and both servers must produce the same number of tokens to be compared).
STORIES = (
    "Write a very long story about a lighthouse keeper who finds a message in a bottle. "
    "Describe every day of the year he spends looking for its author, in detail.",
    "Write a long, detailed history of a small mountain village, century by century, "
    "from its founding to today.",
    "Explain in great detail how a steam engine works, part by part, then how it changed "
    "the world, country by country.",
    "Write a long travel diary of a journey by train across Europe, one entry per city, "
    "with every meal and every person met.",
    "Describe, step by step and in detail, how to build a wooden boat from scratch, "
    "including every tool and every kind of wood.",
    "Write a long fairy tale about a fox, a crow and a clockmaker, with many chapters.",
    "Write a detailed guide to growing vegetables in every season, month by month.",
    "Tell the long life story of a sailor who travels around the world seven times.",
)


# -- the two servers -----------------------------------------------------------------------------


@dataclass
class Peer:
    name: str
    daemon: Daemon
    base: str
    model: str

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid


def neuron_toml(args: argparse.Namespace, model_id: str, model_dir: Path) -> str:
    # Only the llamacpp harness, as on a GGUF-only host.
    return (
        'log_level = "info"\n'
        f"model_dirs = [{json.dumps(str(model_dir))}]\n"
        '[[harnesses]]\nname = "llamacpp"\n'
        f"[cpu]\nthreads = {args.threads}\n"
        f"[admission]\nmax_concurrent = {args.slots}\nmax_queue = 64\n"
        "[harness.llamacpp]\n"
        f"context_tokens = {args.ctx}\n"
        f"slots = {args.slots}\n"
        f"batch_tokens = {args.batch}\n"
        f"threads = {args.threads}\n"
        f'[[default_models]]\nmodel_id = {json.dumps(model_id)}\nharness = "llamacpp"\n'
    )


def start_peer_neuron(args: argparse.Namespace, work: Path) -> Peer:
    gguf: Path = args.gguf.resolve()
    # A folder holding only this GGUF is a model id under model_dirs; otherwise the file.
    alone = [p.name for p in gguf.parent.glob("*.gguf")] == [gguf.name]
    model_id = gguf.parent.name if alone else f"{gguf.parent.name}/{gguf.name}"
    toml = neuron_toml(args, model_id, gguf.parent.parent)
    daemon, base = start_neuron(work, toml, hf_cache=work / "hub", name="peer-neuron")
    served = httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
    return Peer("neuron", daemon, base, served[0]["id"])


def start_llama_server(args: argparse.Namespace, work: Path) -> Peer:
    port = free_port()
    t = str(args.threads)
    cmd = [
        str(args.llama_server),
        *("-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(port)),
        *("-t", t, "-tb", t, "-c", str(args.ctx), "-np", str(args.slots)),
        # The harness's context: n_batch = batch_tokens, n_ubatch = min(that, 512).
        *("-b", str(args.batch), "-ub", str(min(args.batch, 512))),
        *("--cont-batching", "--kv-unified", "--no-ui"),
        *("--alias", "peer"),
        *shlex.split(args.llama_args),
    ]
    daemon = Daemon(cmd, log_path=work / "llama-server.log").start()
    base = f"http://127.0.0.1:{port}"
    daemon.wait_http(f"{base}/health", timeout=180)
    return Peer("llama-server", daemon, base, "peer")


# -- measuring -----------------------------------------------------------------------------------


def chat(
    client: httpx.Client,
    peer: Peer,
    messages: list[dict[str, str]],
    max_tokens: int,
) -> tuple[Stream, dict[str, Any]]:
    """One streamed chat completion, timed as ``bench.neuron_engines.stream_chat`` times it
    (first / last non-empty content chunk), plus llama-server's ``timings`` when it sends
    them (prompt tokens evaluated vs taken from its cache)."""
    body = greedy_stream_body(peer.model, messages, max_tokens)
    out = Stream(sent=time.perf_counter())
    text: list[str] = []
    usage: dict[str, int] | None = None
    timings: dict[str, Any] = {}
    url = f"{peer.base}/v1/chat/completions"
    with client.stream("POST", url, json=body, timeout=600) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{peer.name}: HTTP {resp.status_code}: {resp.read().decode()}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(f"{peer.name}: stream error {chunk['error']}")
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    now = time.perf_counter()
                    out.first = out.first or now
                    out.last = now
                    text.append(piece)
    if usage is None:
        raise RuntimeError(f"{peer.name}: no usage chunk")
    out.tokens = usage["completion_tokens"]
    out.prompt_tokens = usage["prompt_tokens"]
    out.text = "".join(text)
    return out, timings


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    found, frontier = [pid], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def tree_rss(pid: int) -> dict[str, float]:
    """VmRSS (anonymous + file-backed parts) and peak VmHWM of a process tree, in MiB."""
    out = {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0, "VmHWM": 0.0}
    for p in tree_pids(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] += int(value.split()[0]) / 1024
    return {k: round(v, 1) for k, v in out.items()}


@dataclass
class Figures:
    """One server's measurements over the rounds."""

    decode: Series = field(default_factory=Series)
    aggregate: dict[int, Series] = field(default_factory=dict)
    cold_ttft: Series = field(default_factory=lambda: Series(low_is_good=True))
    turn1_ttft: Series = field(default_factory=lambda: Series(low_is_good=True))
    turn2_ttft: Series = field(default_factory=lambda: Series(low_is_good=True))
    completion_tokens: list[int] = field(default_factory=list)
    kv_held: list[int] = field(default_factory=list)  # tokens in the KV before each decode
    cold_prompt_tokens: list[int] = field(default_factory=list)
    turn2_prompt_tokens: list[int] = field(default_factory=list)
    turn2_cache: list[dict[str, Any]] = field(default_factory=list)
    rss_loaded: dict[str, float] = field(default_factory=dict)
    rss_end: dict[str, float] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, peers: list[Peer]) -> None:
        self.args = args
        self.peers = peers
        self.figures = {p.name: Figures() for p in peers}
        self.client = httpx.Client()
        self.long_paragraphs = 1

    def timed(self, peer: Peer, fn: Callable[[], T]) -> tuple[T, float]:
        """``fn()`` once everything but ``peer`` (and this bench) is quiet; the others' load
        in cores while it ran."""
        watch = CpuWatch(tree_pids(peer.pid))
        watch.wait_quiet(self.args.quiet, self.args.quiet_timeout)
        watch.start()
        result = fn()
        return result, watch.foreign()

    # -- prompts -------------------------------------------------------------------------------

    def long_system(self, tag: str) -> str:
        paragraphs = [
            f"{PARAGRAPHS[i % len(PARAGRAPHS)]} ({i})" for i in range(self.long_paragraphs)
        ]
        return f"[{tag}] You are a helpful assistant. Notes:\n" + "\n".join(paragraphs)

    def long_messages(self, tag: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.long_system(tag)},
            {"role": "user", "content": "Summarise the notes above in a few sentences."},
        ]

    def calibrate(self) -> int:
        """Enough paragraphs for a ~--long-tokens prompt, counted by the neuron's tokenizer."""
        neuron = next(p for p in self.peers if p.name == "neuron")
        while True:
            r = httpx.post(
                f"{neuron.base}/tokenize",
                json={"model": neuron.model, "messages": self.long_messages(nonce())},
                timeout=30,
            )
            r.raise_for_status()
            count = int(r.json()["count"])
            if count >= self.args.long_tokens:
                return count
            self.long_paragraphs += 1

    # -- phases --------------------------------------------------------------------------------
    # Each round's prompts are made once and sent to both servers (each has its own cache, so
    # the second gets no head start), so that both decode the same text.

    def round_prompts(self, r: int) -> dict[str, Any]:
        def story(i: int) -> list[dict[str, str]]:
            return [{"role": "user", "content": f"[{nonce()}] {STORIES[i % len(STORIES)]}"}]

        return {
            "single": story(r),
            "streams": {n: [story(r + i) for i in range(n)] for n in self.args.streams},
            "cold": self.long_messages(nonce()),
            "turn2": self.long_messages(nonce()),
        }

    def single(self, peer: Peer, messages: list[dict[str, str]]) -> None:
        f = self.figures[peer.name]
        f.kv_held.append(self.kv_held(peer))
        (s, _), load = self.timed(peer, lambda: chat(self.client, peer, messages, self.args.tokens))
        f.decode.add(s.decode_rate, load)
        f.completion_tokens.append(s.tokens)
        f.texts.append(s.text)

    def streams(self, peer: Peer, n: int, prompts: list[list[dict[str, str]]]) -> None:
        f = self.figures[peer.name]
        (rate, streams), load = self.timed(
            peer, lambda: concurrent_chat(peer.base, peer.model, prompts, self.args.conc_tokens)
        )
        f.aggregate.setdefault(n, Series()).add(rate, load)
        short = [s.tokens for s in streams if s.tokens < self.args.conc_tokens]
        if short:
            print(f"  note: {peer.name} {n} streams: some ended early: {short}")

    def cold(self, peer: Peer, messages: list[dict[str, str]]) -> None:
        f = self.figures[peer.name]
        (s, _), load = self.timed(peer, lambda: chat(self.client, peer, messages, 4))
        f.cold_ttft.add(s.ttft, load)
        f.cold_prompt_tokens.append(s.prompt_tokens)

    def turn2(self, peer: Peer, messages: list[dict[str, str]]) -> None:
        f = self.figures[peer.name]
        (first, _), load = self.timed(
            peer, lambda: chat(self.client, peer, messages, self.args.answer_tokens)
        )
        f.turn1_ttft.add(first.ttft, load)
        follow = [
            *messages,
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "Thank you. Now tell me more about the clockmaker."},
        ]
        before = self.prefix_cache(peer)
        (second, timings), load = self.timed(peer, lambda: chat(self.client, peer, follow, 4))
        f.turn2_ttft.add(second.ttft, load)
        f.turn2_prompt_tokens.append(second.prompt_tokens)
        after = self.prefix_cache(peer)
        if timings:  # llama-server: prompt tokens evaluated, and taken from the slot's KV
            f.turn2_cache.append(
                {"evaluated": timings.get("prompt_n"), "reused": timings.get("cache_n")}
            )
        elif before and after:
            f.turn2_cache.append(
                {
                    k: after[f"prompt_tokens_{k}"] - before[f"prompt_tokens_{k}"]
                    for k in ("evaluated", "reused")
                }
            )

    def kv_held(self, peer: Peer) -> int:
        """Tokens the server keeps in its KV cells (every decode step attends over them)."""
        if peer.name == "neuron":
            return int(self.prefix_cache(peer).get("cached_tokens", -1))
        slots = httpx.get(f"{peer.base}/slots", timeout=10).json()
        return sum(int(slot.get("n_prompt_tokens", 0)) for slot in slots)

    def prefix_cache(self, peer: Peer) -> dict[str, int]:
        if peer.name != "neuron":
            return {}
        health = httpx.get(f"{peer.base}/health", timeout=10).json()
        return (health["models"].get(peer.model) or {}).get("prefix_cache") or {}

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        for peer in self.peers:  # one short generation each: first-request costs out of the way
            chat(self.client, peer, [{"role": "user", "content": "Hello!"}], 8)
        for r in range(args.rounds):
            order = self.peers if r % 2 == 0 else self.peers[::-1]
            prompts = self.round_prompts(r)
            started = time.perf_counter()
            for phase in args.phases:
                for peer in order:
                    if phase == "single":
                        self.single(peer, prompts["single"])
                    elif phase == "streams":
                        for n in args.streams:
                            self.streams(peer, n, prompts["streams"][n])
                    elif phase == "cold":
                        self.cold(peer, prompts["cold"])
                    elif phase == "turn2":
                        self.turn2(peer, prompts["turn2"])
            print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - started:.0f} s")
        for peer in self.peers:
            self.figures[peer.name].rss_end = tree_rss(peer.pid)


# -- report --------------------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    neuron: float
    peer: float
    target: str = ""
    met: bool | None = None
    unit: str = ""

    @property
    def ratio(self) -> float:
        return self.neuron / self.peer if self.peer else float("nan")


def rows(bench: Bench) -> list[Row]:
    q = bench.args.quiet
    n, p = bench.figures["neuron"], bench.figures["llama-server"]

    def med(values: list[int]) -> float:
        return statistics.median(values) if values else float("nan")

    out: list[Row] = []

    def high(name: str, a: Series, b: Series, unit: str) -> None:
        row = Row(name, a.median(q), b.median(q), "≥ 0.95", unit=unit)
        row.met = row.ratio >= 0.95
        out.append(row)

    def low(name: str, a: float, b: float, limit: float, unit: str) -> None:
        row = Row(name, a, b, f"≤ {limit}", unit=unit)
        row.met = row.ratio <= limit
        out.append(row)

    if n.decode.values:
        high("single-stream decode", n.decode, p.decode, "tok/s")
    for k in sorted(n.aggregate):
        high(f"aggregate, {k} streams", n.aggregate[k], p.aggregate[k], "tok/s")
    if n.cold_ttft.values:
        label = f"cold TTFT (~{med(n.cold_prompt_tokens):.0f}-token prompt)"
        low(label, n.cold_ttft.median(q) * 1e3, p.cold_ttft.median(q) * 1e3, 1.1, "ms")
    if n.turn2_ttft.values:
        label = f"second-turn TTFT (~{med(n.turn2_prompt_tokens):.0f} tokens)"
        low(label, n.turn2_ttft.median(q) * 1e3, p.turn2_ttft.median(q) * 1e3, 1.1, "ms")
        out.append(
            Row(
                "turn 1 TTFT (same conversation)",
                n.turn1_ttft.median(q) * 1e3,
                p.turn1_ttft.median(q) * 1e3,
                unit="ms",
            )
        )
    low("RSS after the run", n.rss_end["VmRSS"], p.rss_end["VmRSS"], 1.2, "MiB")
    out.append(Row("RSS after load", n.rss_loaded["VmRSS"], p.rss_loaded["VmRSS"], unit="MiB"))
    out.append(Row("peak RSS (VmHWM)", n.rss_end["VmHWM"], p.rss_end["VmHWM"], unit="MiB"))
    return out


def common_prefix(a: str, b: str) -> int:
    """Characters ``a`` and ``b`` share before they part."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def report(bench: Bench, config: dict[str, Any]) -> dict[str, Any]:
    q = bench.args.quiet
    table = rows(bench)
    print("\nconfig")
    for k, v in config.items():
        print(f"  {k}: {v}")
    print("\n| figure | neuron | llama-server | neuron / llama-server | target |")
    print("|---|---|---|---|---|")
    for row in table:
        fmt = ".0f" if row.unit in ("ms", "MiB") else ".1f"
        verdict = "" if row.met is None else (" met" if row.met else " **missed**")
        print(
            f"| {row.figure} | {row.neuron:{fmt}} {row.unit} | {row.peer:{fmt}} {row.unit} "
            f"| {row.ratio:.3f} | {row.target}{verdict} |"
        )
    details: dict[str, Any] = {}
    for name, f in bench.figures.items():
        d: dict[str, Any] = {
            "decode": f.decode.dump(q),
            "aggregate": {k: s.dump(q) for k, s in f.aggregate.items()},
            "cold_ttft_s": f.cold_ttft.dump(q),
            "turn1_ttft_s": f.turn1_ttft.dump(q),
            "turn2_ttft_s": f.turn2_ttft.dump(q),
            "completion_tokens": f.completion_tokens,
            "kv_held_before_decode": f.kv_held,
            "cold_prompt_tokens": f.cold_prompt_tokens,
            "turn2_prompt_tokens": f.turn2_prompt_tokens,
            "turn2_cache": f.turn2_cache,
            "rss_loaded_mb": f.rss_loaded,
            "rss_end_mb": f.rss_end,
            "first_text": f.texts[0][:200] if f.texts else "",
        }
        details[name] = d
        print(f"\n{name}")
        print(f"  decode tok/s per round: {[round(v, 1) for v in f.decode.values]}")
        print(f"  others' cores per round: {f.decode.foreign}")
        for k, s in f.aggregate.items():
            print(f"  aggregate {k} streams per round: {[round(v, 1) for v in s.values]}")
        print(f"  cold TTFT ms: {[round(v * 1e3) for v in f.cold_ttft.values]}")
        print(f"  turn 2 TTFT ms: {[round(v * 1e3) for v in f.turn2_ttft.values]}")
        print(f"  turn 2 prompt tokens evaluated / reused: {f.turn2_cache}")
        print(f"  completion tokens (single stream): {f.completion_tokens}")
        print(f"  tokens held in the KV before each single-stream round: {f.kv_held}")
        print(f"  RSS after load {f.rss_loaded}, after the run {f.rss_end}")
        print(f"  first answer: {f.texts[0][:80]!r}" if f.texts else "")
    pairs = list(zip(*(f.texts for f in bench.figures.values()), strict=True))
    same = [common_prefix(*texts) for texts in pairs]
    print(
        f"\nsingle-stream answers identical on both servers: "
        f"{sum(a == b for a, b in pairs)} of {len(pairs)} rounds; characters in common "
        f"before they part, per round: {same} (of ~{statistics.median(map(len, pairs[0]))})"
    )
    targets = {
        r.figure: {"neuron": r.neuron, "llama_server": r.peer, "ratio": r.ratio, "met": r.met}
        for r in table
    }
    return {"config": config, "targets": targets, "common_prefix_chars": same, "details": details}


# -- main ----------------------------------------------------------------------------------------


def build_llama_server() -> Path:
    script = ROOT / "bench" / "peers" / "build-llama-server.sh"
    out = subprocess.run([str(script)], check=True, capture_output=True, text=True, cwd=ROOT)
    return Path(out.stdout.strip().splitlines()[-1])


def server_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    return " ".join((out.stdout + out.stderr).split()[-12:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF both servers run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=8192, help="KV cells, shared by all slots")
    parser.add_argument("--slots", type=int, default=8, help="sequences (llama-server -np)")
    parser.add_argument("--batch", type=int, default=512, help="prompt tokens per step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="single-stream max_tokens")
    parser.add_argument("--conc-tokens", type=int, default=64, help="max_tokens per stream")
    parser.add_argument("--streams", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--long-tokens", type=int, default=1500, help="cold / turn-1 prompt")
    parser.add_argument("--answer-tokens", type=int, default=32, help="turn-1 answer")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--llama-server", type=Path, default=None, help="default: build it")
    parser.add_argument(
        "--llama-args", default="", help='extra llama-server arguments ("--cache-ram 0")'
    )
    parser.add_argument("--quiet", type=float, default=0.25, help="others' cores: clean round")
    parser.add_argument("--quiet-timeout", type=float, default=60.0, help="longest wait (s)")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if max(args.streams) > args.slots:
        parser.error("--streams above --slots would queue in both servers")
    args.llama_server = args.llama_server or build_llama_server()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="helexa-bench-peers-"))
    work.mkdir(parents=True, exist_ok=True)

    config = {
        "gguf": f"{args.gguf} ({args.gguf.stat().st_size / MB:.1f} MiB)",
        "threads": args.threads,
        "kv_cells": args.ctx,
        "slots": args.slots,
        "batch": args.batch,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_server": f"{args.llama_server} ({server_version(args.llama_server)})",
        "llama_server_extra_args": args.llama_args or "none",
        "work_dir": str(work),
    }
    peers: list[Peer] = []
    try:
        peers.append(start_peer_neuron(args, work))
        peers.append(start_llama_server(args, work))
        bench = Bench(args, peers)
        time.sleep(1.0)  # let start-up settle before reading the idle RSS
        for peer in peers:
            bench.figures[peer.name].rss_loaded = tree_rss(peer.pid)
        if {"cold", "turn2"} & set(args.phases):
            config["long_prompt_tokens"] = bench.calibrate()
        bench.run()
        result = report(bench, config)
    finally:
        for peer in peers:
            peer.daemon.stop()
    print(f"\nlogs: {work}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
