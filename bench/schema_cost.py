"""What one ``response_format`` schema costs the neuron, against the libraries used directly.

For the largest schemas the limits accept (docs/neuron.md) and for the attacks they refuse,
on the real SmolLM2-135M-Instruct (its GGUF and dense twin, made as the tests make them):

* helexa, llamacpp harness: ``check_schema`` + GBNF + one llama.cpp parse (what
  ``prepare_format`` does per request, off the device worker);
* peer: llama-cpp-python direct, ``LlamaGrammar.from_json_schema`` (converter + parse);
* helexa, transformers harness: ``check_schema`` + llguidance compile (``Grammars.compile``);
* peer: llguidance direct (``grammar_from_json_schema`` + ``LLMatcher``), no limits;
* the refusals: the time ``check_schema`` takes to answer each attack with a 400.

Each case runs in a fresh subprocess for the peers' attack rows (llama.cpp crashes or
exhausts memory on some), with a timeout; times are the median of ``--rounds``.

    PYTHONPATH=. .venv/bin/python -m bench.schema_cost --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "models"

ACCEPTED: dict[str, dict[str, Any]] = {
    "1000-value enum": {"enum": [f"value-number-{i}-{'x' * 40}" for i in range(1000)]},
    "5000 properties": {
        "type": "object",
        "properties": {f"p{i}": {"type": "integer"} for i in range(5000)},
        "required": [f"p{i}" for i in range(5000)],
    },
    "20 arrays of maxItems 1000": {
        "type": "object",
        "properties": {
            f"p{i}": {"type": "array", "maxItems": 1000, "items": {"type": "integer"}}
            for i in range(20)
        },
    },
    "20 strings of maxLength 1000": {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(20)},
    },
    "pattern (ab){100} x 100": {"type": "string", "pattern": "^((ab){100}c){100}$"},
}
ATTACKS: dict[str, dict[str, Any]] = {
    "maxItems 1e9": {"type": "array", "maxItems": 1_000_000_000, "items": {"type": "integer"}},
    "maxLength 1e5": {"type": "string", "maxLength": 100_000},
    "10000-value enum": {"enum": [f"value-{i}" for i in range(10_000)]},
    "100000-value enum": {"enum": [f"value-{i}" for i in range(100_000)]},
}


def median_s(run: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_in_child(engine: str, schema: dict[str, Any], rounds: int) -> dict[str, Any]:
    """One engine on one schema in a child process: (seconds, peak RSS MB) or what killed it."""
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.schema_cost", "--child", engine, "--rounds", str(rounds)],
            input=json.dumps(schema),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return {"outcome": "no answer in 60 s"}
    if done.returncode != 0:
        why = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        return {
            "outcome": f"{why} after {time.perf_counter() - started:.1f} s",
            "last": tail[0][:120],
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(engine: str, rounds: int) -> None:
    import resource

    schema = json.loads(sys.stdin.read())
    text = json.dumps(schema, separators=(",", ":"))
    outcome = "ok"
    run = _engines(engine, text)
    started = time.perf_counter()
    try:
        seconds = median_s(run, rounds)
    except Exception as exc:  # a refusal is an outcome too: how long it took to say no
        seconds, outcome = time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:100]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({"outcome": outcome, "seconds": round(seconds, 4), "peak_mb": peak}))


def _engines(engine: str, text: str) -> Callable[[], Any]:
    from helexa.neuron.sampling import OutputFormat
    from helexa.neuron.schema_limits import check_schema

    fmt = OutputFormat("json_schema", schema=text)
    if engine in ("helexa-gguf", "llama-cpp-python"):
        from helexa.neuron.harness.llamacpp import binding

        gguf = CACHE / "SmolLM2-135M-Instruct-GGUF" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = binding.Model(gguf, None)
        if engine == "helexa-gguf":
            return lambda: (
                check_schema(text),
                binding.Grammar(model.vocab, binding.json_grammar(fmt, "none")),
            )
        from llama_cpp import LlamaGrammar

        return lambda: LlamaGrammar.from_json_schema(text, verbose=False)
    import llguidance
    from transformers import AutoTokenizer

    from helexa.neuron.harness.transformers.constraint import Grammars

    tokenizer = AutoTokenizer.from_pretrained(CACHE / "SmolLM2-135M-Instruct")
    grammars = Grammars(tokenizer, vocab_size=49152, eos_ids=frozenset([2]))
    if engine == "helexa-hf":

        def compile_fresh() -> None:
            check_schema(text)
            grammars._compiled.clear()  # measure the compile, not the cache
            grammars.compile(fmt)

        return compile_fresh
    return lambda: llguidance.LLMatcher(
        grammars.ll, llguidance.LLMatcher.grammar_from_json_schema(text), log_level=0
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rounds)
        return
    from helexa.up.demo_model import demo_dense, demo_gguf

    demo_gguf(CACHE), demo_dense(CACHE)
    engines = ["helexa-gguf", "llama-cpp-python", "helexa-hf", "llguidance"]
    results: dict[str, dict[str, Any]] = {}
    for name, schema in {**ACCEPTED, **ATTACKS}.items():
        rounds = args.rounds if name in ACCEPTED else 1
        results[name] = {e: measure_in_child(e, schema, rounds) for e in engines}
        row = "  ".join(
            f"{e}={r.get('seconds', '-')}s/{r.get('peak_mb', '-')}MB {r['outcome'][:40]}"
            for e, r in results[name].items()
        )
        print(f"{name}: {row}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
