"""One GGUF split across neurons over ggml RPC (issue 22), against the same model whole on
one neuron, with llama.cpp's own pair side by side: ``llama-server`` alone, and
``llama-server --rpc`` to ``ggml-rpc-server`` processes, split the same way.

Everything runs on this machine over loopback, on CPU devices:

- helexa, whole: one neuron with the model;
- helexa, pooled: a borrower neuron and ``--donors`` donor neurons; each donor lends its
  CPU (``POST /rpc/lend``), the borrower loads the model over its own CPU and theirs
  (``POST /models/load`` with ``rpc``), so the traffic goes through the donors' gates;
- llama.cpp, whole: ``llama-server``;
- llama.cpp, pooled: ``llama-server --rpc`` to ``ggml-rpc-server`` processes, with the
  borrower's layer count and split (``-ngl``, ``-ts``).

Figures, medians of ``--rounds`` (the four measured one after the other, order rotated):

- greedy output of a fixed question: equal between whole and pooled (each pair);
- decode tok/s: one stream of ``--tokens`` tokens (first content chunk -> last);
- prefill tok/s: a ~``--prompt-words`` word prompt, new each time (a nonce first), one
  token out: prompt tokens / time to the first token;
- network cost per token (helexa pooled): bytes and RPC replies through the donors'
  gates during decode, per generated token; the decode time a token gains over the whole
  model; and what the gate's relay adds (a borrower loading over ggml-rpc-server
  processes directly, "helexa pooled, no gate").

    bench/peers/build-llama-server.sh          # once: llama-server and ggml-rpc-server
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.pooling --gguf PATH.gguf [--donors 1|2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.neuron_engines import PARAGRAPHS, Stream, nonce
from bench.peers.llama_server import STORIES, Peer, build_llama_server, chat
from helexa.neuron.gguf_header import read_header
from helexa.neuron.harness.llamacpp.plan import MB, pool_split
from tests.support.procs import Daemon, free_port, start_neuron

QUESTION = [{"role": "user", "content": "What is the capital of France? Say why, briefly."}]


def neuron_toml(args: argparse.Namespace, model_dir: Path, ports: int) -> str:
    lo = 50400 + ports * 10
    return (
        f"model_dirs = [{json.dumps(str(model_dir))}]\n"
        '[[harnesses]]\nname = "llamacpp"\n'
        f"[cpu]\nthreads = {args.threads}\n"
        "[harness.llamacpp]\n"
        f"context_tokens = {args.ctx}\nslots = 1\nthreads = {args.threads}\n"
        f"[rpc]\nports = [{lo}, {lo + 9}]\n"
    )


def post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{base}{path}", json=body, timeout=300)
    if response.status_code != 200:
        raise RuntimeError(f"{path}: {response.status_code} {response.text}")
    return response.json()


def start_helexa(
    args: argparse.Namespace, work: Path, model_id: str, model_dir: Path, daemons: list[Daemon]
) -> tuple[Peer, Peer, list[str]]:
    """The whole model on one neuron, and pooled over a borrower and its donors; returns
    both and the donors' bases (their /health shows the traffic)."""
    whole_daemon, whole = start_neuron(
        work / "whole", neuron_toml(args, model_dir, 0), hf_cache=work / "hub", name="whole"
    )
    daemons.append(whole_daemon)
    post(whole, "/models/load", {"model_id": model_id, "devices": []})
    size = post(whole, "/models/size", {"model_id": model_id, "devices": []})["bytes"]
    borrower_daemon, borrower = start_neuron(
        work / "borrower", neuron_toml(args, model_dir, 1), hf_cache=work / "hub", name="b"
    )
    daemons.append(borrower_daemon)
    donors, remote = [], []
    share = -(-size // (args.donors + 1) // MB)  # every host the same share
    for index in range(args.donors):
        daemon, base = start_neuron(
            work / f"donor{index}",
            neuron_toml(args, model_dir, 2 + index),
            hf_cache=work / "hub",
            name=f"donor{index}",
        )
        daemons.append(daemon)
        loan = post(base, "/rpc/lend", {"mb": share, "borrower": "127.0.0.1", "model_id": model_id})
        donors.append(base)
        remote.append({"endpoint": loan["endpoint"], "mb": share})
    spec = {"model_id": model_id, "devices": [], "rpc": remote, "local_mb": share}
    post(borrower, "/models/load", spec)
    return (
        Peer("helexa whole", whole_daemon, whole, model_id),
        Peer("helexa pooled", borrower_daemon, borrower, model_id),
        donors,
    )


def start_llama_cpp(
    args: argparse.Namespace,
    work: Path,
    binary: Path,
    n_layer: int,
    size: int,
    daemons: list[Daemon],
) -> tuple[Peer, Peer]:
    def server(name: str, extra: list[str]) -> Peer:
        port = free_port()
        t = str(args.threads)
        cmd = [
            str(binary),
            *("-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(port)),
            *("-t", t, "-tb", t, "-c", str(args.ctx), "-np", "1", "--no-ui", "--alias", "peer"),
            *("--cache-ram", "0"),
            *extra,
        ]
        daemon = Daemon(cmd, log_path=work / f"{name}.log").start()
        daemons.append(daemon)
        base = f"http://127.0.0.1:{port}"
        daemon.wait_http(f"{base}/health", timeout=180)
        return Peer(name, daemon, base, "peer")

    endpoints = rpc_servers(args, work, binary, "llama.cpp", daemons)
    time.sleep(1.0)
    share = size // (args.donors + 1) // MB
    split = pool_split(
        n_layer=n_layer,
        need=size,
        remote_mb=[share] * args.donors,
        local_mb=share,
        local_gpu=False,
    )
    whole = server("llama.cpp whole", [])
    pooled = server(
        "llama.cpp pooled",
        [
            *("--rpc", ",".join(endpoints)),
            *("-ngl", str(split.n_gpu_layers)),
            *("-ts", ",".join(f"{f:.4f}" for f in split.tensor_split)),
        ],
    )
    return whole, pooled


def rpc_servers(
    args: argparse.Namespace, work: Path, binary: Path, tag: str, daemons: list[Daemon]
) -> list[str]:
    """``--donors`` of llama.cpp's own ggml-rpc-server, on loopback ports."""
    endpoints = []
    for index in range(args.donors):
        port = free_port()
        rpc = binary.with_name("ggml-rpc-server")
        cmd = [str(rpc), "-H", "127.0.0.1", "-p", str(port), "-t", str(args.threads)]
        log = work / f"rpc-server-{tag}{index}.log"
        daemons.append(Daemon(cmd, log_path=log).start())
        endpoints.append(f"127.0.0.1:{port}")
    return endpoints


def start_direct(
    args: argparse.Namespace,
    work: Path,
    binary: Path,
    model_id: str,
    model_dir: Path,
    size: int,
    daemons: list[Daemon],
) -> Peer:
    """A borrower neuron loading over ggml-rpc-server processes directly, no gate between:
    what the gate's relay costs, by difference with "helexa pooled"."""
    endpoints = rpc_servers(args, work, binary, "direct", daemons)
    time.sleep(1.0)
    daemon, base = start_neuron(
        work / "direct", neuron_toml(args, model_dir, 5), hf_cache=work / "hub", name="direct"
    )
    daemons.append(daemon)
    share = -(-size // (args.donors + 1) // MB)
    remote = [{"endpoint": e, "mb": share} for e in endpoints]
    post(
        base,
        "/models/load",
        {"model_id": model_id, "devices": [], "rpc": remote, "local_mb": share},
    )
    return Peer("helexa pooled, no gate", daemon, base, model_id)


def traffic(donors: list[str]) -> tuple[int, int]:
    """Bytes relayed (both ways) and RPC replies through every donor's gate so far."""
    total = replies = 0
    for base in donors:
        for loan in httpx.get(f"{base}/health", timeout=5).json()["loans"]:
            total += loan["bytes_to_donor"] + loan["bytes_to_borrower"]
            replies += loan["messages"]
    return total, replies


def prompt(words: int) -> list[dict[str, str]]:
    text = f"[{nonce()}] "
    while len(text.split()) < words:
        text += " ".join(PARAGRAPHS) + " "
    return [{"role": "user", "content": " ".join(text.split()[:words]) + "\nSummarize."}]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--donors", type=int, default=1, choices=(1, 2))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs")
    args = parser.parse_args()

    gguf: Path = args.gguf.resolve()
    model_id, model_dir = gguf.parent.name, gguf.parent.parent
    binary = build_llama_server()
    work = Path(tempfile.mkdtemp(prefix="bench-pooling-"))
    print(f"servers' logs: {work}", flush=True)
    daemons: list[Daemon] = []
    if True:
        try:
            h_whole, h_pooled, donors = start_helexa(args, work, model_id, model_dir, daemons)
            header = read_header(gguf)
            arch = header.fields["general.architecture"]
            n_layer = int(header.fields[f"{arch}.block_count"])
            size = post(h_whole.base, "/models/size", {"model_id": model_id})["bytes"]
            l_whole, l_pooled = start_llama_cpp(args, work, binary, n_layer, size, daemons)
            direct = start_direct(args, work, binary, model_id, model_dir, size, daemons)
            peers = [h_whole, h_pooled, direct, l_whole, l_pooled]
            report = run(args, peers, donors)
            report["config"] = {
                "gguf": gguf.name,
                "donors": args.donors,
                "threads": args.threads,
                "ctx": args.ctx,
                "tokens": args.tokens,
                "rounds": args.rounds,
                "n_layer": n_layer,
                "size_mb": size // MB,
            }
        finally:
            for daemon in daemons:
                daemon.stop()
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def ask(peer: Peer, messages: list[dict[str, str]], max_tokens: int) -> Stream:
    """One streamed greedy chat on a fresh connection (a kept-alive one a server has
    closed meanwhile would read as the server failing)."""
    with httpx.Client() as client:
        return chat(client, peer, messages, max_tokens)[0]


def run(args: argparse.Namespace, peers: list[Peer], donors: list[str]) -> dict[str, Any]:
    texts = {p.name: ask(p, QUESTION, 48).text for p in peers}
    decode: dict[str, list[float]] = {p.name: [] for p in peers}
    prefill: dict[str, list[float]] = {p.name: [] for p in peers}
    per_token: list[tuple[float, float]] = []
    for round_index in range(args.rounds):
        order = peers[round_index % len(peers) :] + peers[: round_index % len(peers)]
        for peer in order:
            story = [{"role": "user", "content": STORIES[round_index % len(STORIES)]}]
            counted = (0, 0)
            if peer.name == "helexa pooled":
                time.sleep(1.2)  # the last prefill's traffic reported first
                counted = traffic(donors)
            stream = ask(peer, story, args.tokens)
            if peer.name == "helexa pooled":
                time.sleep(1.2)  # the gates report their totals each second
                after = traffic(donors)
                sent, replies = (a - b for a, b in zip(after, counted, strict=True))
                per_token.append((sent / stream.tokens, replies / stream.tokens))
            decode[peer.name].append(stream.decode_rate)
            cold = ask(peer, prompt(args.prompt_words), 1)
            prefill[peer.name].append(cold.prompt_tokens / cold.ttft)
    d = {name: median(v) for name, v in decode.items()}
    p = {name: median(v) for name, v in prefill.items()}
    return {
        "greedy_equal": {
            "helexa": texts["helexa whole"] == texts["helexa pooled"],
            "helexa, no gate": texts["helexa whole"] == texts["helexa pooled, no gate"],
            "llama.cpp": texts["llama.cpp whole"] == texts["llama.cpp pooled"],
            "helexa_vs_llama.cpp_pooled": texts["helexa pooled"] == texts["llama.cpp pooled"],
        },
        "texts": texts,
        "decode_tok_s": d,
        "prefill_tok_s": p,
        "ratios": {
            "helexa pooled / whole, decode": d["helexa pooled"] / d["helexa whole"],
            "llama.cpp pooled / whole, decode": d["llama.cpp pooled"] / d["llama.cpp whole"],
            "helexa pooled / llama.cpp pooled, decode": d["helexa pooled"] / d["llama.cpp pooled"],
            "helexa pooled / no gate, decode": d["helexa pooled"] / d["helexa pooled, no gate"],
            "helexa pooled / whole, prefill": p["helexa pooled"] / p["helexa whole"],
            "llama.cpp pooled / whole, prefill": p["llama.cpp pooled"] / p["llama.cpp whole"],
            "helexa pooled / llama.cpp pooled, prefill": p["helexa pooled"] / p["llama.cpp pooled"],
        },
        "network_per_token": {
            "bytes": median([b for b, _r in per_token]),
            "rpc_replies": median([r for _b, r in per_token]),
            "added_ms_decode_helexa": 1000 / d["helexa pooled"] - 1000 / d["helexa whole"],
            "gate_ms": 1000 / d["helexa pooled"] - 1000 / d["helexa pooled, no gate"],
            "added_ms_decode_llama.cpp": 1000 / d["llama.cpp pooled"] - 1000 / d["llama.cpp whole"],
        },
        "raw": {"decode": decode, "prefill": prefill, "per_token": per_token},
    }


if __name__ == "__main__":
    main()
