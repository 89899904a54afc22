"""The neuron's engines against their peers: decode, batching, prefix reuse, memory.

``--engine llamacpp`` (default) measures the llamacpp harness against llama.cpp itself;
``--engine transformers`` the transformers harness (continuous batching on a paged KV cache)
against ``transformers.generate`` on the same safetensors: single-stream decode, aggregate
tok/s at 1/4/8 streams (``generate`` on a padded batch of the same size), and the TTFT of a
second turn sharing a ~1500-token conversation. The rest of this text is the llamacpp run.

One random-weight Qwen3-shaped model (~136 M parameters: hidden 768, 16 layers, 12/4 heads,
head_dim 128, vocab 896), built here in safetensors and GGUF, measured in one run, peer
beside peer:

1. single stream: decode tok/s and time to first token through the neuron (HTTP streaming,
   greedy, the llamacpp harness on the Q8_0 GGUF) vs llama-cpp-python's ``Llama.generate``
   in this process, on the same prompt tokens (a fresh prompt each round); interleaved;
2. aggregate tok/s of 1, 4 and 8 concurrent streams through the neuron vs llama.cpp's own
   batched decode called directly (one ``llama_decode`` of one token per sequence per step),
   in a context configured as the harness does (unified KV) and with per-sequence KV;
3. time to first token of a second turn sharing a ~1500-token prefix with the first, with
   the neuron's ``/health`` prefix-cache counters (and llama-cpp-python's prefix match);
   then single-stream decode again while those conversations stay cached;
4. RSS growth of the neuron process across ``POST /models/load`` (and after generating) vs
   the GGUF file + KV cache bytes of the "model loaded" log line;
5. for context: single-stream decode of the transformers harness on the safetensors twin.

Decode rate = (tokens - 1) / (time from the first token to the last). Aggregate rate =
completion tokens of every stream / (time from sending the requests to the last token).

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/neuron_engines.py
    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/neuron_engines.py --no-hf \\
        --tokens 128 --rounds 3 --json /tmp/engines.json --work-dir /tmp/engines

On a small shared machine other processes' CPU use wrecks llama.cpp's timings (its threads
spin at barriers, so a stolen core can cost 10x). Before every timed round the bench waits
(up to --quiet-timeout) until other processes use less than --quiet cores, measures their
CPU use during the round, and summarises the clean rounds: "median" is the median of the
rounds where others used < --quiet cores (of all rounds when none was clean), "best" the
best round. Ratios are of those medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp

from helexa.core.wire import ChatMessage
from helexa.neuron.harness.llamacpp import binding
from helexa.neuron.harness.llamacpp.tokenizer import GgufTokenizer, chat_template
from helexa.neuron.harness.prompt import render_chat
from helexa.neuron.sampling import SamplingParams
from helexa.up.tiny_model import GGUF_Q8_0_FILENAME, write_tiny_model_to_hf_cache
from tests.support.procs import Daemon, start_neuron

T = TypeVar("T")
MB = 1024 * 1024
PROMPT = "Tell me about the weather in the city, in detail."
# Text for the long conversation of the prefix test (the tiny tokenizer was trained on
# similar prose: ~4 characters a token).
PARAGRAPHS = (
    "Once upon a time, in a quiet town by the sea, there lived an old clockmaker who repaired "
    "watches for the fishermen. Every morning he opened his shop at seven, made a pot of tea, "
    "and listened to the gulls while the tide came in.",
    "The weather today is sunny with a few clouds in the afternoon. Temperatures will reach "
    "twenty three degrees, with a light wind from the west. Tomorrow there is a chance of rain "
    "in the morning, clearing by the evening.",
    "Servers stream tokens to clients over HTTP. Each request carries a model name, a list of "
    "messages, and options such as temperature, top p, top k, and the maximum number of new "
    "tokens.",
    "The gateway routes the request to a worker with a free GPU, which loads the model, runs "
    "the forward pass, samples the next token, and sends it back until it reaches a stop token.",
    "What is the capital of France? The capital of France is Paris. How many people live in "
    "London? About nine million people live in Greater London.",
)


# -- the machine's other load --------------------------------------------------------------------


class CpuWatch:
    """CPU time used by processes other than this one and ``pids``, in cores."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [os.getpid(), *pids]
        self._tck = os.sysconf("SC_CLK_TCK")
        self._mark = self._sample()

    def _sample(self) -> tuple[float, int, int]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
        ours = 0
        for pid in self.pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            post = stat[stat.rfind(")") + 2 :].split()
            ours += int(post[11]) + int(post[12])  # utime + stime, every thread
        return time.perf_counter(), user + nice + system + irq + softirq, ours

    def start(self) -> None:
        self._mark = self._sample()

    def foreign(self) -> float:
        t0, busy0, ours0 = self._mark
        t1, busy1, ours1 = self._sample()
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / self._tck / max(t1 - t0, 1e-6))

    def wait_quiet(self, threshold: float, timeout: float) -> float:
        deadline = time.perf_counter() + timeout
        while True:
            self.start()
            time.sleep(0.4)
            load = self.foreign()
            if load < threshold or time.perf_counter() > deadline:
                return load


@dataclass
class Series:
    """One measured quantity over rounds, with the other processes' load during each."""

    values: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)
    low_is_good: bool = False

    def add(self, value: float, foreign: float) -> None:
        self.values.append(value)
        self.foreign.append(round(foreign, 2))

    def clean(self, threshold: float) -> list[float]:
        ok = [v for v, f in zip(self.values, self.foreign, strict=True) if f < threshold]
        return ok or self.values

    def median(self, threshold: float) -> float:
        vals = self.clean(threshold)
        return statistics.median(vals) if vals else float("nan")

    def best(self) -> float:
        if not self.values:
            return float("nan")
        return min(self.values) if self.low_is_good else max(self.values)

    def dump(self, threshold: float) -> dict[str, Any]:
        return {
            "median_clean": self.median(threshold),
            "best": self.best(),
            "values": self.values,
            "foreign_cores": self.foreign,
        }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.watch = CpuWatch([])

    def timed(self, fn: Callable[[], T]) -> tuple[T, float]:
        """``fn()`` once the machine is quiet; its result and the others' load meanwhile."""
        self.watch.wait_quiet(self.args.quiet, self.args.quiet_timeout)
        self.watch.start()
        result = fn()
        return result, self.watch.foreign()


# -- the neuron over HTTP ------------------------------------------------------------------------


@dataclass
class Stream:
    """One generation as its consumer saw it (times are perf_counter seconds)."""

    sent: float
    first: float = 0.0
    last: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def decode_rate(self) -> float:
        span = self.last - self.first
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")


def greedy_stream_body(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict:
    """A greedy streamed chat completion that reports its usage at the end."""
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def stream_chat(
    client: httpx.Client, base: str, model: str, messages: list[dict[str, str]], max_tokens: int
) -> Stream:
    body = greedy_stream_body(model, messages, max_tokens)
    out = Stream(sent=time.perf_counter())
    text: list[str] = []
    usage: dict[str, int] | None = None
    with client.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode()}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                delta = choice.get("delta") or {}
                piece = delta.get("content") or delta.get("reasoning_content") or ""
                if piece or delta.get("tool_calls"):
                    now = time.perf_counter()
                    out.first = out.first or now
                    out.last = now
                    text.append(piece)
    assert usage is not None, "no usage chunk"
    out.tokens = usage["completion_tokens"]
    out.prompt_tokens = usage["prompt_tokens"]
    out.text = "".join(text)
    return out


def concurrent_chat(
    base: str, model: str, prompts: list[list[dict[str, str]]], max_tokens: int
) -> tuple[float, list[Stream]]:
    """Every prompt at once, one thread (and connection) each; aggregate tok/s and streams."""
    clients = [httpx.Client() for _ in prompts]
    results: list[Stream | BaseException | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stream_chat(clients[i], base, model, prompts[i], max_tokens)
        except BaseException as exc:  # surfaced below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    streams: list[Stream] = []
    for r in results:
        if not isinstance(r, Stream):
            raise RuntimeError(f"a stream failed: {r!r}")
        streams.append(r)
    end = max(s.last for s in streams)
    return sum(s.tokens for s in streams) / (end - start), streams


def health_model(base: str, model: str) -> dict[str, Any]:
    return httpx.get(f"{base}/health", timeout=10).json()["models"].get(model, {})


def rss(pid: int) -> dict[str, float]:
    """VmRSS and its anonymous / file-backed parts, in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


# -- direct llama.cpp ----------------------------------------------------------------------------


class SplitContext(binding.Context):
    """A context like the harness's but with ``kv_unified = false``: each sequence attends
    over its own n_ctx / n_seq_max cells only (llama.cpp's advice when prefixes are not
    shared)."""

    def __init__(self, model: binding.Model, *, n_ctx: int, n_seq_max: int, threads: int):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = 512
        params.n_ubatch = 512
        params.n_seq_max = n_seq_max
        params.kv_unified = False
        params.no_perf = True
        params.n_threads = params.n_threads_batch = threads
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise MemoryError("no context")
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ptr))
        self.n_vocab = model.vocab.n_tokens


class Direct:
    """llama.cpp in this process: the high-level ``Llama`` (single stream, prefix match) and a
    low-level batched loop over a context of ``slots`` sequences (unified KV as the harness
    configures it, and per-sequence KV)."""

    def __init__(self, gguf: Path, snapshot: Path, *, n_ctx: int, threads: int, slots: int):
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=n_ctx,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.model = binding.Model(gguf, None)
        self.contexts: dict[str, binding.Context] = {
            "unified": binding.Context(
                self.model,
                n_ctx=n_ctx,
                n_batch=512,
                n_seq_max=slots,
                threads=threads,
                flash_attn=None,
            ),
            "split": SplitContext(self.model, n_ctx=n_ctx, n_seq_max=slots, threads=threads),
        }
        self.batch = binding.Batch(512, slots)
        self.slots = slots
        self.tokenizer = GgufTokenizer(self.model.vocab, chat_template(snapshot, self.model))

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        _text, ids = render_chat(self.tokenizer, [ChatMessage(**m) for m in messages], None, None)
        return ids

    def generate(self, ids: list[int], tokens: int, *, keep_cache: bool = False) -> Stream:
        """``Llama.generate``, greedy; ``keep_cache``: let it reuse its matching prefix."""
        if not keep_cache:
            self.llm.reset()
        out = Stream(sent=time.perf_counter())
        produced: list[int] = []
        eos = self.llm.token_eos()
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            now = time.perf_counter()
            if token == eos:
                break
            out.first = out.first or now
            out.last = now
            produced.append(token)
            if len(produced) >= tokens:
                break
        out.tokens = len(produced)
        out.prompt_tokens = len(ids)
        out.text = self.llm.detokenize(produced).decode("utf-8", errors="replace")
        return out

    def _prefill(self, ctx: binding.Context, seq: int, ids: list[int]) -> None:
        for start in range(0, len(ids), self.batch.capacity):
            self.batch.clear()
            self.batch.add(seq, ids[start : start + self.batch.capacity], start, logits_last=False)
            assert ctx.decode(self.batch)

    def batched(
        self,
        prompts: list[list[int]],
        tokens: int,
        *,
        kv: str = "unified",
        retained: list[list[int]] = (),  # type: ignore[assignment]
    ) -> tuple[float, float]:
        """Every prompt in one prefill batch, then one ``llama_decode`` of one token per
        sequence per step, greedy, ``tokens`` each (no early stop). ``retained`` sequences
        are put in the cache first and stay there untouched (as finished requests' caches do
        in the harness). Returns the aggregate rate (every token / the whole time) and the
        decode-only rate (tokens after the first / the time after the first)."""
        ctx, batch, n = self.contexts[kv], self.batch, len(prompts)
        assert n + len(retained) <= self.slots and sum(map(len, prompts)) <= batch.capacity
        ctx.clear()
        for offset, ids in enumerate(retained):
            self._prefill(ctx, n + offset, ids)
        greedy = SamplingParams(temperature=0.0, max_new_tokens=tokens)
        samplers = [
            binding.Sampler(
                greedy, vocab=self.model.vocab, context_length=ctx.n_ctx, grammar=None, prompt=p
            )
            for p in prompts
        ]
        start = time.perf_counter()
        batch.clear()
        rows = [batch.add(seq, p, 0, logits_last=True) for seq, p in enumerate(prompts)]
        assert ctx.decode(batch)
        nxt = [samplers[s].sample(ctx, rows[s]) for s in range(n)]
        first = time.perf_counter()
        pos = [len(p) for p in prompts]
        for _ in range(tokens - 1):
            batch.clear()
            rows = [batch.add(s, [nxt[s]], pos[s], logits_last=True) for s in range(n)]
            assert ctx.decode(batch)
            pos = [p + 1 for p in pos]
            nxt = [samplers[s].sample(ctx, rows[s]) for s in range(n)]
        end = time.perf_counter()
        for sampler in samplers:
            sampler.free()
        return n * tokens / (end - start), n * (tokens - 1) / (end - first)

    def close(self) -> None:
        self.batch.free()
        for ctx in self.contexts.values():
            ctx.free()
        self.model.free()
        self.llm.close()


# -- helpers -------------------------------------------------------------------------------------


def single_messages(tag: str = "") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{tag}{PROMPT}"}]


def nonce() -> str:
    return uuid.uuid4().hex[:8]


def long_conversation(
    direct: Direct, target: int, tag: str, opening: str = ""
) -> list[dict[str, str]]:
    """A system prompt, alternating turns of prose, ending on a user turn: ~``target`` tokens.
    Conversations with the same ``tag`` share the system prompt; ``opening`` starts the first
    user turn (what tells two such conversations apart)."""
    messages = [{"role": "system", "content": f"[session {tag}] You are a helpful assistant."}]
    i = 0
    while True:
        role = "user" if len(messages) % 2 else "assistant"
        text = f"{PARAGRAPHS[i % len(PARAGRAPHS)]} ({i})"
        messages.append({"role": role, "content": f"{opening}{text}" if i == 0 else text})
        i += 1
        if role == "user" and len(direct.ids(messages)) >= target:
            return messages


def load_model(base: str, spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    r = httpx.post(f"{base}/models/load", json=spec, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"load failed: HTTP {r.status_code}: {r.text}")
    return r.json(), time.perf_counter() - started


def loaded_line(daemon: Daemon) -> dict[str, int]:
    """file_mb / kv_mb / mb of the last "model loaded" line of the llamacpp harness."""
    lines = [ln for ln in daemon.log().splitlines() if 'msg="model loaded"' in ln]
    if not lines:
        return {}
    return {k: int(v) for k, v in re.findall(r"\b(file_mb|kv_mb|mb)=(\d+)", lines[-1])}


def neuron_toml(args: argparse.Namespace) -> str:
    threads = f"threads = {args.neuron_threads}\n" if args.neuron_threads else ""
    return (
        'log_level = "info"\n'
        "[admission]\n"
        f"max_concurrent = {max(args.streams)}\n"
        "[harness.llamacpp]\n"
        f"context_tokens = {args.context}\n"
        f"slots = {args.slots}\n"
        f"{threads}"
    )


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Results:
    config: dict[str, Any] = field(default_factory=dict)
    single: dict[str, Any] = field(default_factory=dict)
    concurrency: dict[str, Any] = field(default_factory=dict)
    prefix: dict[str, Any] = field(default_factory=dict)
    retained: dict[str, Any] = field(default_factory=dict)
    interleaved: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    transformers: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def phase_single(bench: Bench, res: Results, direct: Direct, base: str, repo: str) -> None:
    args, q = bench.args, bench.args.quiet
    client = httpx.Client()
    warm = single_messages(f"[{nonce()}] ")
    direct.generate(direct.ids(warm), 8)  # warm both paths
    stream_chat(client, base, repo, warm, 8)
    d_rate, n_rate = Series(), Series()
    d_ttft, n_ttft = Series(low_is_good=True), Series(low_is_good=True)
    mismatch = 0
    for _ in range(args.rounds):  # interleaved so drift hits both alike
        # A fresh prompt each round: the neuron would otherwise reuse the last one's KV.
        messages = single_messages(f"[{nonce()}] ")
        ids = direct.ids(messages)
        d, load = bench.timed(lambda i=ids: direct.generate(i, args.tokens))
        d_rate.add(d.decode_rate, load)
        d_ttft.add(d.ttft, load)
        n, load = bench.timed(lambda m=messages: stream_chat(client, base, repo, m, args.tokens))
        n_rate.add(n.decode_rate, load)
        n_ttft.add(n.ttft, load)
        if n.prompt_tokens != len(ids):
            raise RuntimeError(f"prompt tokens differ: neuron {n.prompt_tokens}, direct {len(ids)}")
        if d.tokens != n.tokens or d.text != n.text:
            mismatch += 1
    client.close()
    if mismatch:
        res.notes.append(
            f"single stream: {mismatch}/{args.rounds} rounds generated different text on the "
            "two sides (greedy both; contexts differ: flash attention auto vs off, unified KV)"
        )
    res.single = {
        "prompt_tokens": n.prompt_tokens,
        "tokens": n.tokens,
        "direct_tok_s": d_rate.dump(q),
        "neuron_tok_s": n_rate.dump(q),
        "direct_ttft_s": d_ttft.dump(q),
        "neuron_ttft_s": n_ttft.dump(q),
        "ratio_median": n_rate.median(q) / d_rate.median(q),
        "ratio_best": n_rate.best() / d_rate.best(),
    }


def phase_concurrency(bench: Bench, res: Results, direct: Direct, base: str, repo: str) -> None:
    args, q = bench.args, bench.args.quiet

    def fresh() -> tuple[list[list[dict[str, str]]], list[list[int]]]:
        # New text every time: the neuron would otherwise reuse earlier prompts' KV.
        tag = nonce()
        prompts = [single_messages(f"[{tag}] Request {i}: ") for i in range(max(args.streams))]
        return prompts, [direct.ids(p) for p in prompts]

    prompts, ids = fresh()
    concurrent_chat(base, repo, prompts[:2], 4)  # warm
    direct.batched(ids[:2], 4)
    direct.batched(ids[:2], 4, kv="split")
    neuron = {n: Series() for n in args.streams}
    unified = {n: Series() for n in args.streams}
    split = {n: Series() for n in args.streams}
    short = 0
    for _ in range(args.conc_rounds):
        for n in args.streams:
            prompts, ids = fresh()
            (rate, streams), load = bench.timed(
                lambda n=n, prompts=prompts: concurrent_chat(
                    base, repo, prompts[:n], args.conc_tokens
                )
            )
            short += sum(s.tokens < args.conc_tokens for s in streams)
            neuron[n].add(rate, load)
            (agg, _dec), load = bench.timed(
                lambda n=n, ids=ids: direct.batched(ids[:n], args.conc_tokens)
            )
            unified[n].add(agg, load)
            (agg, _dec), load = bench.timed(
                lambda n=n, ids=ids: direct.batched(ids[:n], args.conc_tokens, kv="split")
            )
            split[n].add(agg, load)
    if short:
        res.notes.append(f"concurrency: {short} neuron streams ended before max_tokens (EOS)")
    one = min(args.streams)

    def scaling(series: dict[int, Series]) -> dict[str, float]:
        return {str(n): series[n].median(q) / series[one].median(q) for n in args.streams}

    res.concurrency = {
        "tokens_per_stream": args.conc_tokens,
        "neuron_tok_s": {str(n): s.dump(q) for n, s in neuron.items()},
        "direct_unified_tok_s": {str(n): s.dump(q) for n, s in unified.items()},
        "direct_split_tok_s": {str(n): s.dump(q) for n, s in split.items()},
        "neuron_scaling": scaling(neuron),
        "direct_unified_scaling": scaling(unified),
        "direct_split_scaling": scaling(split),
        "neuron_vs_direct_unified": {
            str(n): neuron[n].median(q) / unified[n].median(q) for n in args.streams
        },
        "health_batch": health_model(base, repo).get("batch"),
    }


def phase_prefix(bench: Bench, res: Results, direct: Direct, base: str, repo: str) -> None:
    args = bench.args
    client = httpx.Client()
    rounds = []
    for _ in range(args.prefix_rounds):
        first_msgs = long_conversation(direct, args.prefix_tokens, nonce())
        before = health_model(base, repo).get("prefix_cache") or {}
        t1, load1 = bench.timed(
            lambda m=first_msgs: stream_chat(client, base, repo, m, args.answer_tokens)
        )
        mid = health_model(base, repo).get("prefix_cache") or {}
        second_msgs = [
            *first_msgs,
            {"role": "assistant", "content": t1.text},
            {"role": "user", "content": "And what about tomorrow?"},
        ]
        t2, load2 = bench.timed(
            lambda m=second_msgs: stream_chat(client, base, repo, m, args.answer_tokens)
        )
        after = health_model(base, repo).get("prefix_cache") or {}
        # llama-cpp-python's own prefix match, on the same two prompts
        first_ids, second_ids = direct.ids(first_msgs), direct.ids(second_msgs)
        d1, load3 = bench.timed(lambda i=first_ids: direct.generate(i, args.answer_tokens))
        d2, load4 = bench.timed(
            lambda i=second_ids: direct.generate(i, args.answer_tokens, keep_cache=True)
        )

        def delta(a: dict[str, int], b: dict[str, int], key: str) -> int:
            return int(b.get(key, 0)) - int(a.get(key, 0))

        rounds.append(
            {
                "first_prompt_tokens": t1.prompt_tokens,
                "second_prompt_tokens": t2.prompt_tokens,
                "neuron_ttft_first_s": t1.ttft,
                "neuron_ttft_second_s": t2.ttft,
                "neuron_ratio": t2.ttft / t1.ttft,
                "first_evaluated": delta(before, mid, "prompt_tokens_evaluated"),
                "first_reused": delta(before, mid, "prompt_tokens_reused"),
                "second_evaluated": delta(mid, after, "prompt_tokens_evaluated"),
                "second_reused": delta(mid, after, "prompt_tokens_reused"),
                "direct_ttft_first_s": d1.ttft,
                "direct_ttft_second_s": d2.ttft,
                "direct_ratio": d2.ttft / d1.ttft,
                "foreign_cores": [round(x, 2) for x in (load1, load2, load3, load4)],
            }
        )
    client.close()
    res.prefix = {
        "rounds": rounds,
        "health": health_model(base, repo).get("prefix_cache"),
        "neuron_ratio_median": statistics.median(r["neuron_ratio"] for r in rounds),
        "direct_ratio_median": statistics.median(r["direct_ratio"] for r in rounds),
    }


def phase_retained(bench: Bench, res: Results, direct: Direct, base: str, repo: str) -> None:
    """Single-stream decode while earlier conversations stay cached in other slots (the
    prefix phase leaves them): in a unified KV every sequence's attention spans the cells up
    to the highest one in use, masked or not. Same measurement on a direct unified context
    with the same number of cached tokens parked in other sequences."""
    args, q = bench.args, bench.args.quiet
    cache = health_model(base, repo).get("prefix_cache") or {}
    cached = int(cache.get("cached_tokens", 0))
    client = httpx.Client()
    neuron, clean_direct, parked_direct = Series(), Series(), Series()
    per_seq = min(max(cached // 3, 1), args.context // 4)
    filler = [direct.ids(long_conversation(direct, per_seq, nonce()))[:per_seq] for _ in range(3)]
    for _ in range(args.retained_rounds):
        messages = single_messages(f"[{nonce()}] ")
        ids = direct.ids(messages)
        n, load = bench.timed(lambda m=messages: stream_chat(client, base, repo, m, args.tokens))
        neuron.add(n.decode_rate, load)
        (_agg, dec), load = bench.timed(lambda i=ids: direct.batched([i], args.tokens))
        clean_direct.add(dec, load)
        (_agg, dec), load = bench.timed(
            lambda i=ids: direct.batched([i], args.tokens, retained=filler)
        )
        parked_direct.add(dec, load)
    client.close()
    before = res.single.get("neuron_tok_s", {}).get("median_clean")
    res.retained = {
        "neuron_cached_tokens": cached,
        "direct_parked_tokens": sum(map(len, filler)),
        "neuron_tok_s": neuron.dump(q),
        "neuron_tok_s_empty_cache": before,
        "direct_unified_empty_tok_s": clean_direct.dump(q),
        "direct_unified_parked_tok_s": parked_direct.dump(q),
    }


def phase_interleaved(bench: Bench, res: Results, direct: Direct, base: str, repo: str) -> None:
    """Two conversations with the same system prompt, turns alternating (A1, B1, A2): does
    A's second turn still find A's first in the cache, with free slots to spare?"""
    args = bench.args
    tag = nonce()
    convs = {
        name: long_conversation(direct, args.prefix_tokens, tag, f"Conversation {name}. ")
        for name in ("A", "B")
    }
    client = httpx.Client()

    def turn(messages: list[dict[str, str]]) -> tuple[Stream, float, dict[str, int]]:
        before = health_model(base, repo).get("prefix_cache") or {}
        s, load = bench.timed(lambda: stream_chat(client, base, repo, messages, args.answer_tokens))
        after = health_model(base, repo).get("prefix_cache") or {}
        return s, load, {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in after}

    a1, load_a1, _ = turn(convs["A"])
    b1, load_b1, delta_b1 = turn(convs["B"])
    a2_messages = [
        *convs["A"],
        {"role": "assistant", "content": a1.text},
        {"role": "user", "content": "And what about tomorrow?"},
    ]
    a2, load_a2, delta_a2 = turn(a2_messages)
    client.close()
    res.interleaved = {
        "a1_ttft_s": a1.ttft,
        "b1_ttft_s": b1.ttft,
        "a2_ttft_s": a2.ttft,
        "a2_ratio": a2.ttft / a1.ttft,
        "b1_reused": delta_b1.get("prompt_tokens_reused"),
        "a2_prompt_tokens": a2.prompt_tokens,
        "a2_reused": delta_a2.get("prompt_tokens_reused"),
        "a2_evaluated": delta_a2.get("prompt_tokens_evaluated"),
        "foreign_cores": [round(x, 2) for x in (load_a1, load_b1, load_a2)],
    }


def phase_transformers(bench: Bench, res: Results, base: str, repo: str, pid: int) -> None:
    args, q = bench.args, bench.args.quiet
    httpx.post(f"{base}/models/unload", json={"model_id": repo}, timeout=120).raise_for_status()
    before = rss(pid)
    status, secs = load_model(base, {"model_id": repo, "harness": "transformers"})
    after = rss(pid)
    client = httpx.Client()
    stream_chat(client, base, repo, single_messages(f"[{nonce()}] "), 4)
    rate, ttft = Series(), Series(low_is_good=True)
    for _ in range(args.hf_rounds):
        m = single_messages(f"[{nonce()}] ")
        s, load = bench.timed(lambda m=m: stream_chat(client, base, repo, m, args.hf_tokens))
        rate.add(s.decode_rate, load)
        ttft.add(s.ttft, load)
    client.close()
    res.transformers = {
        "tokens": s.tokens,
        "tok_s": rate.dump(q),
        "ttft_s": ttft.dump(q),
        "load_s": secs,
        "vram_used_mb": status["model"]["vram_used_mb"],
        "rss_increase_mb": after["VmRSS"] - before["VmRSS"],
    }


def run(args: argparse.Namespace) -> Results:
    res = Results()
    bench = Bench(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="helexa-bench-engines-"))
    cache = work / "hub"
    repo = f"bench/qwen3-h{args.hidden}-l{args.layers}"
    shape = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": max(args.context, 8192),
    }
    t = time.perf_counter()
    snapshot = write_tiny_model_to_hf_cache(cache, repo, with_gguf=True, **shape)
    gguf = snapshot / GGUF_Q8_0_FILENAME
    built = time.perf_counter() - t
    os.environ["HF_HUB_OFFLINE"] = "1"
    direct = Direct(gguf, snapshot, n_ctx=args.context, threads=args.threads, slots=args.slots)
    res.config = {
        **shape,
        "head_dim": 128,
        "repo": repo,
        "params_m": round(llama_cpp.llama_model_n_params(direct.model.ptr) / 1e6, 1),
        "gguf_mb": round(gguf.stat().st_size / MB, 1),
        "safetensors_mb": round((snapshot / "model.safetensors").stat().st_size / MB, 1),
        "context_tokens": args.context,
        "slots": args.slots,
        "threads_direct": args.threads,
        "threads_neuron": args.neuron_threads or "unset (llama.cpp default)",
        "cpus": os.cpu_count(),
        "llama_cpp_python": llama_cpp.__version__,
        "build_s": round(built, 1),
        "quiet_cores": args.quiet,
    }
    daemon, base = start_neuron(work, neuron_toml(args), hf_cache=cache, name="bench-neuron")
    pid = daemon.proc.pid  # type: ignore[union-attr]
    bench.watch = CpuWatch([pid])
    started = time.perf_counter()
    try:
        time.sleep(1.0)  # let start-up settle before the baseline
        rss_before = rss(pid)
        status, load_s = load_model(base, {"model_id": repo, "quant": "Q8_0"})
        rss_loaded = rss(pid)
        sizes = loaded_line(daemon)
        if "single" in args.phases:
            phase_single(bench, res, direct, base, repo)
        else:
            stream_chat(httpx.Client(), base, repo, single_messages(), 16)
        rss_used = rss(pid)
        if "concurrency" in args.phases:
            phase_concurrency(bench, res, direct, base, repo)
        if "prefix" in args.phases:
            phase_prefix(bench, res, direct, base, repo)
            if args.retained_rounds:
                phase_retained(bench, res, direct, base, repo)
            phase_interleaved(bench, res, direct, base, repo)
        rss_end = rss(pid)
        res.memory = {
            "load_s": load_s,
            "vram_used_mb": status["model"]["vram_used_mb"],
            "log_file_mb": sizes.get("file_mb"),
            "log_kv_mb": sizes.get("kv_mb"),
            "file_plus_kv_mb": sizes.get("file_mb", 0) + sizes.get("kv_mb", 0),
            "rss_before_mb": rss_before,
            "rss_after_load_mb": rss_loaded,
            "rss_after_generation_mb": rss_used,
            "rss_after_all_mb": rss_end,
        }
        if "hf" in args.phases:
            phase_transformers(bench, res, base, repo, pid)
    finally:
        daemon.stop()
        direct.close()
        res.config["neuron_log"] = str(daemon.log_path)
        res.config["measure_s"] = round(time.perf_counter() - started, 1)
    targets(res)
    return res


def targets(res: Results) -> None:
    found: dict[str, tuple[float, float, bool]] = {}
    if res.single:
        found["single decode neuron/direct >= 0.9"] = (res.single["ratio_median"], 0.9, True)
    if res.concurrency:
        scaling = res.concurrency["neuron_scaling"]
        for n, goal in ((4, 1.7), (8, 2.3)):
            if str(n) in scaling:
                found[f"neuron {n} streams / 1 stream >= {goal}"] = (scaling[str(n)], goal, True)
    if res.prefix:
        found["2nd-turn TTFT / 1st <= 0.25"] = (res.prefix["neuron_ratio_median"], 0.25, False)
    if res.interleaved:
        found["(extra) interleaved A2 TTFT / A1 <= 0.25"] = (
            res.interleaved["a2_ratio"],
            0.25,
            False,
        )
    if res.memory:
        m = res.memory
        denom = m["file_plus_kv_mb"] or float("nan")
        for label, key in (("load", "rss_after_load_mb"), ("all phases", "rss_after_all_mb")):
            growth = m[key]["VmRSS"] - m["rss_before_mb"]["VmRSS"]
            found[f"RSS increase ({label}) / (file+KV) <= 1.3"] = (growth / denom, 1.3, False)
    for key, (value, goal, higher) in found.items():
        met = value >= goal if higher else value <= goal
        res.targets[key] = {"value": round(value, 3), "goal": goal, "met": bool(met)}


# -- report --------------------------------------------------------------------------------------


def _row(name: str, series: dict[str, Any], scale: float = 1.0) -> str:
    rounds = ", ".join(
        f"{v * scale:.1f}{'*' if f >= QUIET[0] else ''}"
        for v, f in zip(series["values"], series["foreign_cores"], strict=True)
    )
    return (
        f"  {name:36}{series['median_clean'] * scale:9.1f}{series['best'] * scale:9.1f}   {rounds}"
    )


QUIET = [0.25]  # the report marks rounds measured while others used this many cores or more


def report(args: argparse.Namespace, res: Results) -> None:
    c = res.config
    print(
        f"\nmodel {c['repo']}: {c['params_m']}M params, Q8_0 GGUF {c['gguf_mb']} MiB, "
        f"safetensors {c['safetensors_mb']} MiB; context {c['context_tokens']}, slots "
        f"{c['slots']}; threads direct={c['threads_direct']} neuron={c['threads_neuron']}; "
        f"{c['cpus']} CPUs; llama-cpp-python {c['llama_cpp_python']}; measured in "
        f"{c['measure_s']}s"
    )
    print(f"(* = round measured while other processes used >= {args.quiet} cores)")
    s = res.single
    if s:
        print(
            f"\n[1] single stream: {s['tokens']} tokens, prompt {s['prompt_tokens']} tokens, "
            f"{args.rounds} rounds"
        )
        print(f"  {'':36}{'median':>9}{'best':>9}   rounds")
        print(_row("direct Llama.generate   tok/s", s["direct_tok_s"]))
        print(_row("neuron llamacpp (HTTP)  tok/s", s["neuron_tok_s"]))
        print(_row("direct Llama.generate   TTFT ms", s["direct_ttft_s"], 1e3))
        print(_row("neuron llamacpp (HTTP)  TTFT ms", s["neuron_ttft_s"], 1e3))
        print(
            f"  {'ratio neuron/direct (decode)':36}{s['ratio_median']:9.3f}{s['ratio_best']:9.3f}"
        )
        h = res.transformers
        if h:
            print(_row(f"neuron transformers fp32 tok/s ({h['tokens']})", h["tok_s"]))
            print(_row("neuron transformers fp32 TTFT ms", h["ttft_s"], 1e3))
            ratio = s["neuron_tok_s"]["median_clean"] / h["tok_s"]["median_clean"]
            print(
                f"  llamacpp / transformers decode: {ratio:.1f}x; transformers RSS increase "
                f"{h['rss_increase_mb']:.0f} MiB (reported {h['vram_used_mb']} MiB)"
            )
    k = res.concurrency
    if k:
        print(
            f"\n[2] aggregate tok/s (all tokens / wall time incl. prefill), "
            f"{k['tokens_per_stream']} tokens per stream, {args.conc_rounds} rounds, medians"
        )
        print(
            f"  {'streams':>8}{'neuron':>9}{'scale':>7}{'direct unified':>16}{'scale':>7}"
            f"{'direct split-KV':>17}{'scale':>7}{'neuron/unified':>16}"
        )
        for n in args.streams:
            key = str(n)
            print(
                f"  {n:>8}{k['neuron_tok_s'][key]['median_clean']:9.1f}"
                f"{k['neuron_scaling'][key]:7.2f}"
                f"{k['direct_unified_tok_s'][key]['median_clean']:16.1f}"
                f"{k['direct_unified_scaling'][key]:7.2f}"
                f"{k['direct_split_tok_s'][key]['median_clean']:17.1f}"
                f"{k['direct_split_scaling'][key]:7.2f}"
                f"{k['neuron_vs_direct_unified'][key]:16.3f}"
            )
        for n in args.streams:
            key = str(n)
            print(
                f"  rounds {n}: neuron "
                + ", ".join(
                    f"{v:.0f}{'*' if f >= args.quiet else ''}"
                    for v, f in zip(
                        k["neuron_tok_s"][key]["values"],
                        k["neuron_tok_s"][key]["foreign_cores"],
                        strict=True,
                    )
                )
                + " | unified "
                + ", ".join(f"{v:.0f}" for v in k["direct_unified_tok_s"][key]["values"])
                + " | split "
                + ", ".join(f"{v:.0f}" for v in k["direct_split_tok_s"][key]["values"])
            )
        print(f"  neuron /health batch: {k['health_batch']}")
    p = res.prefix
    if p:
        print(
            f"\n[3] prefix reuse: second turn after a ~{args.prefix_tokens}-token conversation "
            f"({args.answer_tokens}-token answers)"
        )
        print(
            f"  {'prompt 1st/2nd':>15}{'neuron TTFT ms':>16}{'ratio':>7}{'evaluated':>11}"
            f"{'reused':>8}{'direct TTFT ms':>16}{'ratio':>7}   others' cores"
        )
        for r in p["rounds"]:
            print(
                f"  {r['first_prompt_tokens']:>7}/{r['second_prompt_tokens']:<7}"
                f"{r['neuron_ttft_first_s'] * 1e3:8.0f}/{r['neuron_ttft_second_s'] * 1e3:<7.0f}"
                f"{r['neuron_ratio']:7.3f}{r['first_evaluated']:>6}/{r['second_evaluated']:<4}"
                f"{r['second_reused']:>8}"
                f"{r['direct_ttft_first_s'] * 1e3:8.0f}/{r['direct_ttft_second_s'] * 1e3:<7.0f}"
                f"{r['direct_ratio']:7.3f}   {r['foreign_cores']}"
            )
        print(
            f"  median ratio: neuron {p['neuron_ratio_median']:.3f}, "
            f"direct (llama-cpp-python prefix match) {p['direct_ratio_median']:.3f}"
        )
        print(f"  /health prefix_cache: {p['health']}")
    r = res.retained
    if r:
        print(
            f"\n[3b] single-stream decode with other conversations cached (neuron: "
            f"{r['neuron_cached_tokens']} cached tokens; direct: {r['direct_parked_tokens']} "
            "tokens parked in 3 other sequences)"
        )
        print(f"  {'':36}{'median':>9}{'best':>9}   rounds")
        print(_row("neuron, cache holding conversations", r["neuron_tok_s"]))
        if r["neuron_tok_s_empty_cache"]:
            print(f"  {'neuron, [1] (nearly empty cache)':36}{r['neuron_tok_s_empty_cache']:9.1f}")
        print(_row("direct unified KV, empty", r["direct_unified_empty_tok_s"]))
        print(_row("direct unified KV, parked sequences", r["direct_unified_parked_tok_s"]))
    x = res.interleaved
    if x:
        print(
            "\n[3c] two conversations sharing a system prompt, turns A1, B1, A2 (free slots "
            "and KV room for both)"
        )
        print(
            f"  TTFT ms: A1 {x['a1_ttft_s'] * 1e3:.0f}, B1 {x['b1_ttft_s'] * 1e3:.0f} (reused "
            f"{x['b1_reused']}), A2 {x['a2_ttft_s'] * 1e3:.0f} = {x['a2_ratio']:.3f}x A1; A2 "
            f"prompt {x['a2_prompt_tokens']}: reused {x['a2_reused']}, evaluated "
            f"{x['a2_evaluated']}; others' cores {x['foreign_cores']}"
        )
    m = res.memory
    if m:
        print("\n[4] memory of the neuron process (MiB)")
        print(
            f"  GGUF file {m['log_file_mb']} + KV {m['log_kv_mb']} = {m['file_plus_kv_mb']} "
            f"(/models vram_used_mb {m['vram_used_mb']}); load took {m['load_s']:.2f}s"
        )
        for label, key in (
            ("before load", "rss_before_mb"),
            ("after load", "rss_after_load_mb"),
            ("after first generations", "rss_after_generation_mb"),
            ("after every phase", "rss_after_all_mb"),
        ):
            x = m[key]
            inc = x["VmRSS"] - m["rss_before_mb"]["VmRSS"]
            print(
                f"  {label:24} RSS {x['VmRSS']:7.1f} (anon {x['RssAnon']:6.1f}, file "
                f"{x['RssFile']:6.1f})  increase {inc:6.1f} = "
                f"{inc / (m['file_plus_kv_mb'] or float('nan')):.2f}x file+KV"
            )
    print("\ntargets")
    for name, t in res.targets.items():
        print(f"  {name:46} {t['value']:8.3f}  {'met' if t['met'] else 'MISSED'}")
    for note in res.notes:
        print(f"note: {note}")


# -- the transformers engine (--engine transformers) ----------------------------------------------


class GenerateDirect:
    """``transformers.generate`` in this process on the same safetensors, fp32, greedy."""

    def __init__(self, snapshot: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(snapshot))
        self.model = AutoModelForCausalLM.from_pretrained(str(snapshot), dtype=torch.float32)
        self.model.eval()

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        _text, ids = render_chat(self.tokenizer, [ChatMessage(**m) for m in messages], None, None)
        return ids

    def generate(self, batch: list[list[int]], tokens: int) -> tuple[float, Stream]:
        """Greedy ``tokens`` new tokens for every prompt of ``batch`` at once (left-padded);
        aggregate tok/s (sent to last token) and the first row's stream timings."""
        torch = self.torch
        longest = max(len(ids) for ids in batch)
        pad = 0
        input_ids = torch.tensor([[pad] * (longest - len(i)) + i for i in batch])
        mask = torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in batch])
        out = Stream(sent=time.perf_counter())
        seen = {"prompt": False}

        class Timer:
            def put(self, _value: Any) -> None:
                if not seen["prompt"]:  # the first call carries the prompt
                    seen["prompt"] = True
                    return
                now = time.perf_counter()
                out.first = out.first or now
                out.last = now
                out.tokens += 1

            def end(self) -> None:
                return None

        with torch.inference_mode():
            self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=pad,
                streamer=Timer() if len(batch) == 1 else None,
            )
        end = time.perf_counter()
        if len(batch) > 1:
            out.first, out.last, out.tokens = end, end, tokens
        out.prompt_tokens = len(batch[0])
        return len(batch) * tokens / (end - out.sent), out


def hf_neuron_toml(args: argparse.Namespace) -> str:
    return (
        'log_level = "info"\n'
        'harnesses = [{name = "transformers"}]\n'
        "[admission]\n"
        f"max_concurrent = {max(args.streams)}\n"
        "[harness.transformers]\n"
        f"max_sequences = {max(max(args.streams), args.slots)}\n"
        f"kv_cache_mb = {args.kv_cache_mb}\n"
    )


def run_transformers(args: argparse.Namespace) -> Results:
    """Issue 10's measurements: the transformers harness (continuous batching, paged KV,
    prefix cache) against ``transformers.generate`` on the same safetensors."""
    res = Results()
    bench = Bench(args)
    q = args.quiet
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="helexa-bench-engines-"))
    cache = work / "hub"
    repo = f"bench/qwen3-h{args.hidden}-l{args.layers}"
    shape = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "num_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": max(args.context, 8192),
    }
    snapshot = write_tiny_model_to_hf_cache(cache, repo, with_gguf=True, **shape)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    direct = GenerateDirect(snapshot)
    res.config = {
        **shape,
        "engine": "transformers",
        "repo": repo,
        "params_m": round(sum(p.numel() for p in direct.model.parameters()) / 1e6, 1),
        "safetensors_mb": round((snapshot / "model.safetensors").stat().st_size / MB, 1),
        "kv_cache_mb": args.kv_cache_mb,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quiet_cores": q,
    }
    daemon, base = start_neuron(work, hf_neuron_toml(args), hf_cache=cache, name="bench-neuron")
    bench.watch = CpuWatch([daemon.proc.pid])  # type: ignore[union-attr]
    started = time.perf_counter()
    client = httpx.Client()
    try:
        status, load_s = load_model(base, {"model_id": repo, "harness": "transformers"})
        res.memory = {"load_s": load_s, "vram_used_mb": status["model"]["vram_used_mb"]}
        stream_chat(client, base, repo, single_messages(f"[{nonce()}] "), 8)  # warm
        direct.generate([direct.ids(single_messages(f"[{nonce()}] "))], 8)
        if "single" in args.phases:
            neuron, gen = Series(), Series()
            for _ in range(args.rounds):
                messages = single_messages(f"[{nonce()}] ")
                s, load = bench.timed(
                    lambda m=messages: stream_chat(client, base, repo, m, args.tokens)
                )
                neuron.add(s.decode_rate, load)
                ids = direct.ids(messages)
                (_agg, g), load = bench.timed(lambda i=ids: direct.generate([i], args.tokens))
                gen.add(g.decode_rate, load)
            res.single = {
                "tokens": args.tokens,
                "prompt_tokens": s.prompt_tokens,
                "neuron_tok_s": neuron.dump(q),
                "generate_tok_s": gen.dump(q),
                "ratio_median": neuron.median(q) / gen.median(q),
            }
        if "concurrency" in args.phases:
            neuron_n = {n: Series() for n in args.streams}
            gen_n = {n: Series() for n in args.streams}
            for _ in range(args.conc_rounds):
                for n in args.streams:
                    tag = nonce()
                    prompts = [single_messages(f"[{tag}] Request {i}: ") for i in range(n)]
                    (rate, _s), load = bench.timed(
                        lambda p=prompts: concurrent_chat(base, repo, p, args.conc_tokens)
                    )
                    neuron_n[n].add(rate, load)
                    ids = [direct.ids(p) for p in prompts]
                    (agg, _g), load = bench.timed(
                        lambda i=ids: direct.generate(i, args.conc_tokens)
                    )
                    gen_n[n].add(agg, load)
            one = min(args.streams)
            res.concurrency = {
                "tokens_per_stream": args.conc_tokens,
                "neuron_tok_s": {str(n): s.dump(q) for n, s in neuron_n.items()},
                "generate_tok_s": {str(n): s.dump(q) for n, s in gen_n.items()},
                "neuron_scaling": {
                    str(n): neuron_n[n].median(q) / neuron_n[one].median(q) for n in args.streams
                },
                "generate_scaling": {
                    str(n): gen_n[n].median(q) / gen_n[one].median(q) for n in args.streams
                },
                "health_batch": health_model(base, repo).get("batch"),
            }
        if "prefix" in args.phases:
            rounds = []
            for _ in range(args.prefix_rounds):
                first = long_conversation(direct, args.prefix_tokens, nonce())  # type: ignore[arg-type]
                t1, l1 = bench.timed(
                    lambda m=first: stream_chat(client, base, repo, m, args.answer_tokens)
                )
                second = [
                    *first,
                    {"role": "assistant", "content": t1.text},
                    {"role": "user", "content": "And what about tomorrow?"},
                ]
                before = health_model(base, repo).get("prefix_cache") or {}
                t2, l2 = bench.timed(
                    lambda m=second: stream_chat(client, base, repo, m, args.answer_tokens)
                )
                after = health_model(base, repo).get("prefix_cache") or {}
                ids = direct.ids(second)
                (_a, g2), l3 = bench.timed(lambda i=ids: direct.generate([i], 2))
                rounds.append(
                    {
                        "first_prompt_tokens": t1.prompt_tokens,
                        "second_prompt_tokens": t2.prompt_tokens,
                        "neuron_ttft_first_s": t1.ttft,
                        "neuron_ttft_second_s": t2.ttft,
                        "neuron_ratio": t2.ttft / t1.ttft,
                        "second_reused": int(after.get("prompt_tokens_reused", 0))
                        - int(before.get("prompt_tokens_reused", 0)),
                        "second_evaluated": int(after.get("prompt_tokens_evaluated", 0))
                        - int(before.get("prompt_tokens_evaluated", 0)),
                        "generate_ttft_second_s": g2.ttft,
                        "foreign_cores": [round(x, 2) for x in (l1, l2, l3)],
                    }
                )
            res.prefix = {
                "rounds": rounds,
                "health": health_model(base, repo).get("prefix_cache"),
                "neuron_ratio_median": statistics.median(r["neuron_ratio"] for r in rounds),
            }
    finally:
        client.close()
        daemon.stop()
        res.config["neuron_log"] = str(daemon.log_path)
        res.config["measure_s"] = round(time.perf_counter() - started, 1)
    found: dict[str, tuple[float, float, bool]] = {}
    if res.single:
        found["single neuron / generate >= 1.1"] = (res.single["ratio_median"], 1.1, True)
    if res.concurrency:
        for n, goal in ((4, 2.0), (8, 3.5)):
            if str(n) in res.concurrency["neuron_scaling"]:
                value = res.concurrency["neuron_scaling"][str(n)]
                found[f"neuron {n} streams / 1 stream >= {goal}"] = (value, goal, True)
    if res.prefix:
        found["2nd-turn TTFT / 1st <= 0.3"] = (res.prefix["neuron_ratio_median"], 0.3, False)
    for key, (value, goal, higher) in found.items():
        met = value >= goal if higher else value <= goal
        res.targets[key] = {"value": round(value, 3), "goal": goal, "met": bool(met)}
    return res


def report_transformers(args: argparse.Namespace, res: Results) -> None:
    c = res.config
    print(
        f"\nmodel {c['repo']}: {c['params_m']}M params fp32, safetensors {c['safetensors_mb']} "
        f"MiB; KV cache {c['kv_cache_mb']} MiB; {c['cpus']} CPUs, torch {c['torch']} "
        f"({c['torch_threads']} threads); measured in {c['measure_s']}s"
    )
    s = res.single
    if s:
        print(f"\n[1] single stream: {s['tokens']} tokens, prompt {s['prompt_tokens']} tokens")
        print(f"  {'':36}{'median':>9}{'best':>9}   rounds")
        print(_row("transformers.generate  tok/s", s["generate_tok_s"]))
        print(_row("neuron transformers    tok/s", s["neuron_tok_s"]))
        print(f"  {'ratio neuron/generate':36}{s['ratio_median']:9.3f}")
    k = res.concurrency
    if k:
        print(
            f"\n[2] aggregate tok/s (all tokens / wall time incl. prefill), "
            f"{k['tokens_per_stream']} tokens per stream, medians"
        )
        print(f"  {'streams':>8}{'neuron':>9}{'scale':>7}{'generate(batch)':>17}{'scale':>7}")
        for n in args.streams:
            key = str(n)
            print(
                f"  {n:>8}{k['neuron_tok_s'][key]['median_clean']:9.1f}"
                f"{k['neuron_scaling'][key]:7.2f}"
                f"{k['generate_tok_s'][key]['median_clean']:17.1f}"
                f"{k['generate_scaling'][key]:7.2f}"
            )
        print(f"  neuron /health batch: {k['health_batch']}")
    p = res.prefix
    if p:
        print(f"\n[3] second turn after a ~{args.prefix_tokens}-token conversation")
        for r in p["rounds"]:
            print(
                f"  prompt {r['first_prompt_tokens']}/{r['second_prompt_tokens']}: neuron TTFT "
                f"{r['neuron_ttft_first_s'] * 1e3:.0f}/{r['neuron_ttft_second_s'] * 1e3:.0f} ms "
                f"= {r['neuron_ratio']:.3f}; reused {r['second_reused']}, evaluated "
                f"{r['second_evaluated']}; generate (no cache) 2nd TTFT "
                f"{r['generate_ttft_second_s'] * 1e3:.0f} ms; others' cores {r['foreign_cores']}"
            )
        print(f"  /health prefix_cache: {p['health']}")
    print("\ntargets")
    for name, t in res.targets.items():
        print(f"  {name:46} {t['value']:8.3f}  {'met' if t['met'] else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engine",
        choices=["llamacpp", "transformers"],
        default="llamacpp",
        help="llamacpp: vs llama.cpp; transformers: vs transformers.generate",
    )
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="transformers KV cache")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=896, help="the tiny tokenizer allows <= 899")
    parser.add_argument("--context", type=int, default=4096, help="KV cells ([harness.llamacpp])")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, direct side")
    parser.add_argument(
        "--neuron-threads",
        type=int,
        default=None,
        help="[harness.llamacpp] threads (default: --threads; 0: leave unset)",
    )
    parser.add_argument("--tokens", type=int, default=200, help="single-stream tokens")
    parser.add_argument("--rounds", type=int, default=5, help="single-stream rounds")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--conc-tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--conc-rounds", type=int, default=3)
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--prefix-rounds", type=int, default=3)
    parser.add_argument("--retained-rounds", type=int, default=2, help="0: skip [3b]")
    parser.add_argument("--hf-tokens", type=int, default=32, help="transformers tokens")
    parser.add_argument("--hf-rounds", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers harness")
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["single", "concurrency", "prefix", "hf"],
        choices=["single", "concurrency", "prefix", "hf"],
    )
    parser.add_argument(
        "--quiet", type=float, default=0.25, help="others' cores below which a round is clean"
    )
    parser.add_argument(
        "--quiet-timeout", type=float, default=15.0, help="longest wait for a quiet machine (s)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="reused: the model cache")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.neuron_threads is None:
        args.neuron_threads = args.threads
    if args.no_hf and "hf" in args.phases:
        args.phases.remove("hf")
    args.streams = sorted(set(args.streams))
    QUIET[0] = args.quiet
    if args.engine == "transformers":
        res = run_transformers(args)
        report_transformers(args, res)
    else:
        res = run(args)
        report(args, res)
    blob = json.dumps(asdict(res), indent=1, default=str)
    print("\nJSON")
    print(blob)
    if args.json:
        args.json.write_text(blob + "\n")


if __name__ == "__main__":
    main()
