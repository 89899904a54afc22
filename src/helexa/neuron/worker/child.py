"""A device worker process: owns one device (a GPU, or the CPU) and every engine on it.

Started by the neuron (``parent.WorkerProcess``) as ``python -m helexa.neuron.worker FD``
with one end of a socket pair. It builds the engines on its device the way a neuron without
workers would (``DevicePool`` + ``build_harnesses``: loads, the batched engine loop on the
device thread, KV caches, sampling), then serves ``protocol`` calls until the neuron's end
closes. A native fault here kills this process only: the neuron fails what it had in
flight and starts another.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import faulthandler
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from helexa.core.logs import setup_logging
from helexa.neuron.config import NeuronSettings
from helexa.neuron.devices import CPU, DevicePool
from helexa.neuron.harness.base import Finish, Harness, TokenStream
from helexa.neuron.harness.registry import build_harnesses
from helexa.neuron.worker import faults
from helexa.neuron.worker.lifeline import die_with_parent
from helexa.neuron.worker.protocol import (
    Call,
    Cancel,
    EngineView,
    Failure,
    Init,
    Output,
    Ping,
    Pong,
    Ready,
    Reply,
    Shutdown,
    Snapshot,
    failure_of,
)

log = logging.getLogger("helexa.neuron.worker")

PREPARED_KEPT = 256  # response_format grammars prepared and not yet used by a generate
SNAPSHOT_EVERY_S = 0.5  # while generating: prefix-cache and batch figures for /health
STARTED = time.monotonic()


class Worker:
    def __init__(
        self, conn: Connection, init: Init, pool: DevicePool, harnesses: dict[str, Harness]
    ) -> None:
        self.conn = conn
        self.pool = pool
        self.device = init.device
        self.device_key = CPU if init.device == CPU else "cuda:0"  # as this process sees it
        self.harnesses = harnesses
        self.send_lock = threading.Lock()
        self.closed = asyncio.Event()
        self.streams: dict[int, TokenStream] = {}
        self.prepared: collections.OrderedDict[int, object] = collections.OrderedDict()
        self.handles = itertools.count(1)
        self.outbox_lock = threading.Lock()
        self.pieces: dict[int, list[str]] = {}
        self.ends: dict[int, Finish | Failure] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.fault = faults.parse(os.environ.get(faults.ENV))
        self.held: dict[str, int] = {}  # bytes of each device held outside this worker
        pool.outside = lambda key: self.held.get(key, 0)

    # -- transport ---------------------------------------------------------------------------

    def send(self, message: object) -> None:
        with self.send_lock:
            self.conn.send(message)

    def read_frames(self, loop: asyncio.AbstractEventLoop) -> None:
        """The reader thread: frames onto the loop; the neuron gone, the loop told."""
        try:
            while True:
                message = self.conn.recv()
                loop.call_soon_threadsafe(self.dispatch, message)
                if isinstance(message, Shutdown):
                    return
        except (EOFError, OSError):
            loop.call_soon_threadsafe(self.closed.set)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self.read_frames, args=(loop,), daemon=True).start()
        self.send(Ready(pid=os.getpid(), engines=tuple(self.harnesses), startup_s=startup_s()))
        ticker = loop.create_task(self.tick())
        await self.closed.wait()
        ticker.cancel()
        for harness in self.harnesses.values():
            for status in harness.list():
                try:
                    await harness.unload(status.id)
                except Exception as exc:
                    log.warning("unload failed", extra={"model_id": status.id, "error": str(exc)})

    def dispatch(self, message: object) -> None:
        if isinstance(message, Call):
            task = asyncio.ensure_future(self.run(message))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif isinstance(message, Cancel):
            stream = self.streams.get(message.id)
            if stream is not None:
                stream.cancel()
        elif isinstance(message, Ping):
            self.send(Pong(message.seq))
        elif isinstance(message, Shutdown):
            self.closed.set()

    # -- calls -------------------------------------------------------------------------------

    async def run(self, call: Call) -> None:
        try:
            value = await self.perform(call)
        except BaseException as exc:  # every failure goes back to the caller, typed
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.send(Reply(call.id, error=failure_of(exc)))
            return
        if call.method in ("load", "unload"):
            self.send(self.snapshot())  # before the reply: the neuron sees the model at once
        self.send(Reply(call.id, value=value))

    async def perform(self, call: Call) -> Any:
        if call.method == "hold":  # memory of this device others hold (lent, other workers)
            key, size = call.args
            self.held[key] = size
            return None
        harness = self.harnesses[call.engine]
        if call.method == "generate":
            model_id, prompt, params = call.args
            if isinstance(params.prepared_format, int):
                prepared = self.prepared.pop(params.prepared_format, None)
                params = _with_prepared(params, prepared)
            harness.new_stream = lambda: self.relayed(call.id)  # type: ignore[attr-defined]
            try:
                harness.generate(model_id, prompt, params)
            except BaseException:
                self.streams.pop(call.id, None)
                raise
            return None
        if call.method == "prepare_format":
            prepared = await harness.prepare_format(*call.args)
            handle = next(self.handles)
            self.prepared[handle] = prepared
            while len(self.prepared) > PREPARED_KEPT:  # never used (the request was refused)
                self.prepared.popitem(last=False)
            return handle
        if call.method == "load":
            model_id = call.args[0].model_id
            faults.on_load(self.fault, model_id)
            status = await harness.load(*call.args)
            faults.after_load(self.fault, model_id, self.pool.worker(self.device_key).poison)
            return status
        if call.method in ("unload", "size", "prepare_chat", "prepare_text"):
            return await getattr(harness, call.method)(*call.args)
        raise ValueError(f"unknown worker call {call.method!r}")

    # -- output ------------------------------------------------------------------------------

    def relayed(self, gen_id: int) -> Relayed:
        stream = Relayed(asyncio.get_running_loop(), self, gen_id)
        self.streams[gen_id] = stream
        return stream

    def piece(self, gen_id: int, text: str) -> None:
        with self.outbox_lock:
            self.pieces.setdefault(gen_id, []).append(text)

    def end(self, gen_id: int, end: Finish | Failure) -> None:
        with self.outbox_lock:
            self.ends[gen_id] = end
        self.streams.pop(gen_id, None)

    def flush(self) -> None:
        """Send what the generations produced since the last flush, as one ``Output``: called
        on the device thread after every engine step (so one frame carries every running
        sequence's new text), and by the loop for ends outside a step."""
        with self.outbox_lock:
            if not self.pieces and not self.ends:
                return
            pieces, self.pieces = self.pieces, {}
            ends, self.ends = self.ends, {}
        if ends:
            self.send(self.snapshot())  # the books (prefix hits, steps) before the ends
        self.send(Output(pieces=pieces, ends=ends))

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_EVERY_S)
            self.flush()  # ends that came outside a step (an engine closed by an unload)
            if self.streams:
                self.send(self.snapshot())

    def snapshot(self) -> Snapshot:
        engines = {}
        for name, harness in self.harnesses.items():
            models = harness.list()
            engines[name] = EngineView(
                models=models,
                loading=harness.loading(),
                memory_bytes=sum(harness.memory_used_bytes(k) for k in {CPU, self.device_key}),
                prefix={m.id: harness.prefix_cache(m.id) for m in models},
                batch={m.id: harness.batch_info(m.id) for m in models},
            )
        return Snapshot(engines=engines, poisoned=self.pool.worker(self.device_key).poisoned)


class Relayed(TokenStream):
    """A generation's stream inside a worker: its text goes straight from the device thread
    into the worker's outbox, and its end too; nothing is consumed on this process's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, worker: Worker, gen_id: int) -> None:
        super().__init__(loop)
        self.worker = worker
        self.gen_id = gen_id

    def emit(self, text: str) -> None:
        self.worker.piece(self.gen_id, text)

    def attach(self, future: Future[Finish], cancel_hook: Callable[[], None]) -> None:
        self._future = future
        self._cancel_hook = cancel_hook
        future.add_done_callback(self._report)

    def _report(self, future: Future[Finish]) -> None:
        if future.cancelled():
            end: Finish | Failure = failure_of(RuntimeError("the generation was cancelled"))
        elif future.exception() is not None:
            end = failure_of(future.exception())  # type: ignore[arg-type]
        else:
            end = future.result()
        self.worker.end(self.gen_id, end)


def _with_prepared(params: Any, prepared: object | None) -> Any:
    return dataclasses.replace(params, prepared_format=prepared)


def startup_s() -> float:
    """Seconds since this interpreter started (imports included), from /proc."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            now = float(uptime.read().split()[0])
        return round(now - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return round(time.monotonic() - STARTED, 3)


def main(argv: list[str]) -> None:
    conn = Connection(int(argv[0]))
    init: Init = conn.recv()
    settings = NeuronSettings.model_validate(init.settings)
    setup_logging(settings.log_level)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the neuron's to handle
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so is systemd's stop: it drains first
    gpu = init.device != CPU
    pool = DevicePool(
        [0] if gpu else [],
        cpu_threads=settings.cpu.threads,
        cpu_budget_bytes=init.cpu_budget_bytes,
    )
    harnesses = build_harnesses(settings, pool, list(init.engines))
    worker = Worker(conn, init, pool, harnesses)
    for key in {CPU, worker.device_key}:
        pool.worker(key).after_job = worker.flush  # the step's output leaves from there
    pool.start()
    log.info("worker ready", extra={"device": init.device, "engines": ",".join(harnesses)})
    try:
        asyncio.run(worker.serve())
    finally:
        pool.stop()
