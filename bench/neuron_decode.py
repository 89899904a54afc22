"""Decode throughput: the neuron's HTTP streaming path vs a bare in-process decode loop.

Same model (a random-weight Qwen3-shaped model built here), same prompt, same seed,
greedy, interleaved rounds in one run. Decode rate = (tokens - 1) / (time from the first
token to the last), so prefill is excluded on both sides.

    .venv/bin/python bench/neuron_decode.py                 # CPU, the "small" shape
    .venv/bin/python bench/neuron_decode.py --shape tiny --tokens 400
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helexa.core.wire import ChatMessage
from helexa.neuron.harness.engine import Engine, Generation
from helexa.neuron.harness.prompt import render_chat
from helexa.neuron.harness.transformers import loader
from helexa.neuron.harness.transformers.batched import PagedBackend, kv_shape, use_paged_attention
from helexa.neuron.harness.transformers.paged import PagedKv, blocks_for
from helexa.neuron.model_files import ModelFiles, read_json
from helexa.neuron.sampling import SamplingParams
from helexa.up.tiny_model import write_tiny_model_to_hf_cache
from tests.support.procs import start_neuron

SHAPES = {
    # name: (hidden_size, num_layers); vocab stays at the tiny tokenizer's 512
    "tiny": (64, 2),
    "small": (512, 8),
    "medium": (1024, 16),
}
PROMPT = [{"role": "user", "content": "Tell me about the weather in the city, in detail."}]


class _Inline:
    """Stands in for the device worker: the bench steps the engine itself, in this thread."""

    def submit_stepped(self, job: object) -> Future[None]:
        return Future()


def bare_rate(snapshot: Path, tokens: int) -> tuple[float, int, str]:
    files = ModelFiles(root=snapshot)
    if str(snapshot) not in _MODEL_CACHE:
        model = loader.load_weights(files, torch.float32, torch.device("cpu"))
        use_paged_attention(model)
        _MODEL_CACHE[str(snapshot)] = model
    model = _MODEL_CACHE[str(snapshot)]
    tokenizer = _TOK_CACHE.setdefault(str(snapshot), loader.load_tokenizer(files))
    _text, ids = render_chat(tokenizer, [ChatMessage(**m) for m in PROMPT], None, None)
    gen_config = read_json(snapshot / "generation_config.json")
    params = SamplingParams(
        temperature=0.0, max_new_tokens=tokens, eos_ids=loader.eos_ids(gen_config, {}, tokenizer)
    )
    pieces: list[str] = []
    cpu = torch.device("cpu")
    shape = kv_shape(model)
    assert shape is not None
    kv = PagedKv(shape, blocks=blocks_for(len(ids) + tokens, 16), block_size=16, device=cpu)
    engine = Engine(
        PagedBackend(model, kv, cpu),
        _Inline(),  # type: ignore[arg-type]
        slots=1,
        batch_tokens=4096,
        is_loaded=lambda: True,
    )
    generation = Generation(prompt_ids=ids, params=params, tokenizer=tokenizer, emit=pieces.append)
    engine.submit(generation)
    engine.step()  # prefill + first token
    first = time.perf_counter()
    while not generation.future.done():
        engine.step()
    elapsed = time.perf_counter() - first
    generated = generation.future.result().completion_tokens
    return (generated - 1) / elapsed, generated, "".join(pieces)


_MODEL_CACHE: dict[str, object] = {}
_TOK_CACHE: dict[str, object] = {}


def http_rate(base: str, model_id: str, tokens: int) -> tuple[float, int, str]:
    body = {
        "model": model_id,
        "messages": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first = last = 0.0
    text: list[str] = []
    usage = None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                content = choice["delta"].get("content")
                if content:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(content)
    assert usage is not None
    generated = usage["completion_tokens"]
    return (generated - 1) / (last - first), generated, "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    hidden, layers = SHAPES[args.shape]
    work = Path(tempfile.mkdtemp(prefix="helexa-bench-"))
    cache = work / "hub"
    repo = f"bench/qwen3-{args.shape}"
    snapshot = write_tiny_model_to_hf_cache(cache, repo, hidden_size=hidden, num_layers=layers)
    os.environ["HF_HUB_OFFLINE"] = "1"
    daemon, base = start_neuron(
        work,
        f'log_level = "debug"\n[[default_models]]\nmodel_id = "{repo}"\n',
        hf_cache=cache,
        name="bench-neuron",
    )
    try:
        bare_rate(snapshot, 8)  # warm up both paths
        http_rate(base, repo, 8)
        bare, http = [], []
        for _ in range(args.rounds):  # interleaved so drift hits both alike
            rate, n_bare, text_bare = bare_rate(snapshot, args.tokens)
            bare.append(rate)
            rate, n_http, text_http = http_rate(base, repo, args.tokens)
            http.append(rate)
            assert n_bare == n_http and text_bare == text_http, "paths generated different text"
        server_side = [float(x) for x in re.findall(r"decode_tok_s=([\d.]+)", daemon.log())]
    finally:
        daemon.stop()
    params = sum(p.numel() for p in next(iter(_MODEL_CACHE.values())).parameters())  # type: ignore[attr-defined]
    b, h = statistics.median(bare), statistics.median(http)
    print(
        f"shape={args.shape} params={params / 1e6:.1f}M tokens={n_bare} rounds={args.rounds} "
        f"torch_threads={torch.get_num_threads()}"
    )
    print(
        f"bare in-process decode : {b:8.1f} tok/s  (rounds: {', '.join(f'{r:.1f}' for r in bare)})"
    )
    print(
        f"HTTP streaming (neuron): {h:8.1f} tok/s  (rounds: {', '.join(f'{r:.1f}' for r in http)})"
    )
    inside = statistics.median(server_side[-args.rounds :])
    print(f"inside the neuron      : {inside:8.1f} tok/s  (decode loop on its device thread)")
    print(f"ratio HTTP/bare        : {h / b:8.3f}")


if __name__ == "__main__":
    main()
