"""What one engine step's message costs between a device worker process and the neuron's
main process, for the transports a worker-per-device neuron could use.

A step message carries every running sequence's new output: (sequence id, text piece,
token count, finished) for S sequences. The worker is a separate process, as it would be.
The main side receives in an asyncio event loop, as the neuron's HTTP loop would. Two
figures per transport and S:

- round trip: the main side asks for a step, the worker answers with one step message
  (p50 / p99 over ``--pings``); one way is about half of it;
- stream: the worker sends ``--messages`` step messages back to back; the main side's
  messages/s and its CPU per message (decode included). That CPU comes out of the loop
  that also serves HTTP.

Transports:
- ``pipe+pickle``: ``multiprocessing.Pipe`` (``send_bytes``) with pickle, the loop watching
  the pipe's fd;
- ``pipe+msgspec``: the same pipe, typed msgspec msgpack structs;
- ``zmq+msgspec``: a pyzmq PAIR socket over ``ipc://`` (``zmq.asyncio``) with msgspec.

    .venv/bin/python bench/ipc_step.py [--sequences 1 8 64] [--json FILE]

msgspec and pyzmq are not dependencies of helexa (yet): ``pip install msgspec pyzmq``
first. A transport whose library is missing is skipped and said so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

try:
    import msgspec
except ImportError:  # measured only where installed
    msgspec = None  # type: ignore[assignment]
try:
    import zmq
    import zmq.asyncio
except ImportError:
    zmq = None  # type: ignore[assignment]

PIECE = "word"  # a typical detokenized piece

if msgspec is not None:

    class Output(msgspec.Struct, array_like=True):
        """One sequence's new output in a step (module level: msgspec resolves the names)."""

        sequence: int
        text: str
        tokens: int
        finished: bool

    class Step(msgspec.Struct, array_like=True):
        outputs: list[Output]


def step(sequences: int, number: int) -> list[tuple[int, str, int, bool]]:
    return [(i, PIECE, number, False) for i in range(sequences)]


# --- codecs -----------------------------------------------------------------------------------


def codec(name: str) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    if name == "pickle":
        return (lambda m: pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)), pickle.loads
    assert msgspec is not None
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(Step)

    def encode(message: Any) -> bytes:
        return encoder.encode(Step([Output(*o) for o in message]))

    def decode(raw: bytes) -> Any:
        return decoder.decode(raw).outputs

    return encode, decode


# --- the worker side (a child process) --------------------------------------------------------


def pipe_worker(conn: Any, kind: str, sequences: int, messages: int) -> None:
    encode, _decode = codec(kind)
    while True:
        order = conn.recv_bytes()
        if order == b"stop":
            return
        if order == b"stream":
            for n in range(messages):
                conn.send_bytes(encode(step(sequences, n)))
            conn.send_bytes(b"end")
        else:
            conn.send_bytes(encode(step(sequences, 0)))


def zmq_worker(address: str, sequences: int, messages: int) -> None:
    encode, _decode = codec("msgspec")
    socket = zmq.Context().socket(zmq.PAIR)
    socket.connect(address)
    while True:
        order = socket.recv()
        if order == b"stop":
            return
        if order == b"stream":
            for n in range(messages):
                socket.send(encode(step(sequences, n)))
            socket.send(b"end")
        else:
            socket.send(encode(step(sequences, 0)))


# --- the main side (an asyncio loop) ----------------------------------------------------------


class PipeMain:
    def __init__(self, kind: str, sequences: int, messages: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=pipe_worker, args=(child, kind, sequences, messages))
        self.proc.start()
        self.decode = codec(kind)[1]
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        asyncio.get_running_loop().add_reader(self.conn.fileno(), self._readable)

    def _readable(self) -> None:
        while self.conn.poll():
            self.queue.put_nowait(self.conn.recv_bytes())

    async def send(self, data: bytes) -> None:
        self.conn.send_bytes(data)

    async def recv(self) -> bytes:
        return await self.queue.get()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.conn.fileno())
        self.conn.send_bytes(b"stop")
        self.proc.join(10)


class ZmqMain:
    def __init__(self, sequences: int, messages: int) -> None:
        self.address = f"ipc://{tempfile.mkdtemp()}/step.sock"
        self.socket = zmq.asyncio.Context().socket(zmq.PAIR)
        self.socket.bind(self.address)
        ctx = mp.get_context("spawn")
        self.proc = ctx.Process(target=zmq_worker, args=(self.address, sequences, messages))
        self.proc.start()
        self.decode = codec("msgspec")[1]

    async def send(self, data: bytes) -> None:
        await self.socket.send(data)

    async def recv(self) -> bytes:
        return await self.socket.recv()

    def close(self) -> None:
        self.socket.send(b"stop")
        self.proc.join(10)


async def measure(transport: str, sequences: int, pings: int, messages: int) -> dict[str, Any]:
    main: PipeMain | ZmqMain
    if transport == "zmq+msgspec":
        main = ZmqMain(sequences, messages)
    else:
        main = PipeMain(transport.split("+")[1], sequences, messages)
    try:
        for _ in range(50):  # warm up (the worker's imports, the first messages)
            await main.send(b"ping")
            main.decode(await main.recv())
        rtts = []
        for _ in range(pings):
            sent = time.perf_counter()
            await main.send(b"ping")
            main.decode(await main.recv())
            rtts.append(time.perf_counter() - sent)
        await main.send(b"stream")
        cpu, wall = time.process_time(), time.perf_counter()
        size = 0
        while (raw := await main.recv()) != b"end":
            size = len(raw)
            main.decode(raw)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        main.close()
    rtts.sort()
    return {
        "transport": transport,
        "sequences": sequences,
        "message_bytes": size,
        "rtt_p50_us": round(statistics.median(rtts) * 1e6, 1),
        "rtt_p99_us": round(rtts[int(len(rtts) * 0.99)] * 1e6, 1),
        "stream_msgs_per_s": round(messages / wall),
        "main_cpu_us_per_msg": round(cpu / messages * 1e6, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    transports = ["pipe+pickle"]
    if msgspec is None:
        print("skipped pipe+msgspec and zmq+msgspec: msgspec is not installed")
    else:
        transports.append("pipe+msgspec")
        if zmq is None:
            print("skipped zmq+msgspec: pyzmq is not installed")
        else:
            transports.append("zmq+msgspec")
    results = []
    for sequences in args.sequences:
        for transport in transports:
            result = asyncio.run(measure(transport, sequences, args.pings, args.messages))
            print(json.dumps(result))
            results.append(result)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"cpus": os.cpu_count(), "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
