"""The neuron's end of one worker process: start it, call it, stream from it, see it die.

Frames are read on a thread of their own and handed to the event loop, which does no model
work: a generation's text arrives in batched ``Output`` frames and is handed to its
``TokenStream`` as it would be from a device thread. When the worker's end closes (it
exited, was killed, aborted), everything it had in flight fails at once with
``EngineCrashed`` naming the signal or status, and the supervisor is told.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.reduction import ForkingPickler
from typing import Any

from helexa.neuron.harness.base import EngineCrashed, Finish, PreparedPrompt, TokenStream
from helexa.neuron.sampling import SamplingParams
from helexa.neuron.worker.protocol import (
    Call,
    Cancel,
    Failure,
    Init,
    Output,
    Ping,
    Pong,
    Ready,
    Reply,
    Shutdown,
    Snapshot,
    exception_of,
)

log = logging.getLogger("helexa.neuron.worker")

TAIL_LINES = 40  # the worker's last output lines, for the crash report


def describe_exit(device: str, pid: int | None, returncode: int | None) -> str:
    """How a worker ended, in words: the signal that killed it, or its exit status."""
    who = f"the {device} worker (pid {pid})"
    if returncode is None:
        return f"{who} stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{who} was killed by {name}"
    return f"{who} exited with status {returncode}"


class WorkerProcess:
    def __init__(
        self,
        device: str,
        *,
        on_snapshot: Callable[[Snapshot], None],
        on_lost: Callable[[str, list[str]], None],
        lost_hint: str | None = None,
        stall_timeout_s: float | None = None,
    ) -> None:
        self.device = device
        self.lost_hint = lost_hint  # appended to the reason its end gives
        # Generating and no output for this long: killed (a pooled model's donor stopped
        # answering leaves its decode waiting on a socket, its loop still answering pings).
        self.stall_timeout_s = stall_timeout_s
        self.last_output = 0.0
        self.on_snapshot = on_snapshot
        self.on_lost = on_lost
        self.proc: subprocess.Popen[bytes] | None = None
        self.frames: Frames | None = None
        self.ready: Ready | None = None
        self.snapshot: Snapshot | None = None
        self.alive = False
        self.output_frames = 0  # Output frames received: one per engine step or fewer
        self.stopping = False  # an exit we asked for is not a crash
        self.kill_reason: str | None = None  # why the neuron killed it, when it did
        self.last_pong = 0.0
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, tuple[TokenStream, Future[Finish]]] = {}
        self._started: asyncio.Future[Ready] | None = None
        self._losing: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def in_flight(self) -> int:
        return len(self._streams)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, init: Init, env: dict[str, str], timeout_s: float) -> Ready:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "helexa.neuron.worker", str(theirs.fileno()), self.device],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                env=env,
                close_fds=True,
            )
        finally:
            theirs.close()
            os.close(out_w)
        _transport, self.frames = await loop.create_connection(
            lambda: Frames(self._receive_safely, self._closed), sock=ours
        )
        self.alive = True
        self._started = loop.create_future()
        threading.Thread(target=self._relay_output, args=(out_r,), daemon=True).start()
        self._send(init)
        try:
            async with asyncio.timeout(timeout_s):
                self.ready = await asyncio.shield(self._started)
        except TimeoutError:
            self.kill()
            raise EngineCrashed(
                f"the {self.device} worker (pid {self.pid}) did not start within {timeout_s:g} s"
            ) from None
        return self.ready

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to release everything and exit; kill it if it does not."""
        self.stopping = True
        if self.alive:
            with contextlib.suppress(OSError):
                self._send(Shutdown())
        if self.proc is not None:
            try:
                await asyncio.to_thread(self.proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("worker did not stop; killing it", extra={"device": self.device})
                self.kill()
                await asyncio.to_thread(self.proc.wait)

    def kill(self, reason: str | None = None) -> None:
        """SIGKILL; ``reason`` (a device fault, a hang) leads the crash report."""
        if reason and self.kill_reason is None:
            self.kill_reason = reason
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    async def watch(self, period_s: float, timeout_s: float) -> None:
        """Ping every ``period_s``; a worker silent for ``timeout_s`` (stopped, deadlocked in
        native code) is killed, so what it holds fails instead of hanging."""
        self.last_pong = time.monotonic()
        seq = 0
        while self.alive:
            stalled = self._stalled_s()
            if stalled is not None:
                log.error(
                    "worker stalled; killing it",
                    extra={"device": self.device, "pid": self.pid, "stalled_s": round(stalled)},
                )
                self.kill(f"it generated nothing for {stalled:.0f} s")
                return
            silent = time.monotonic() - self.last_pong
            if silent > timeout_s:
                log.error(
                    "worker stopped answering; killing it",
                    extra={"device": self.device, "pid": self.pid, "silent_s": round(silent, 1)},
                )
                self.kill(f"it stopped answering for {silent:.0f} s")
                return
            seq += 1
            try:
                self._send(Ping(seq))
            except OSError:
                return
            await asyncio.sleep(period_s)

    def _stalled_s(self) -> float | None:
        """How long it has been generating without output, past ``stall_timeout_s``."""
        if self.stall_timeout_s is None or not self._streams:
            return None
        stalled = time.monotonic() - self.last_output
        return stalled if stalled > self.stall_timeout_s else None

    # -- calls -------------------------------------------------------------------------------

    def _send(self, message: object) -> None:
        if self.frames is None or self.frames.transport is None:
            raise OSError("the worker's connection is closed")
        self.frames.send(message)

    def _gone(self) -> EngineCrashed:
        return EngineCrashed(f"the {self.device} worker is not running")

    async def call(self, engine: str, method: str, *args: Any) -> Any:
        if not self.alive:
            raise self._gone()
        call_id = next(self._ids)
        reply = asyncio.get_running_loop().create_future()
        self._calls[call_id] = reply
        try:
            self._send(Call(call_id, engine, method, args))
        except OSError:
            self._calls.pop(call_id, None)
            raise self._gone() from None
        return await reply

    def generate(
        self, engine: str, model_id: str, prompt: PreparedPrompt, params: SamplingParams
    ) -> TokenStream:
        if not self.alive:
            raise self._gone()
        gen_id = next(self._ids)
        stream = TokenStream(asyncio.get_running_loop())
        done: Future[Finish] = Future()
        stream.attach(done, lambda: self._cancel(gen_id))
        if not self._streams:
            self.last_output = time.monotonic()  # the stall clock starts with the work
        self._streams[gen_id] = (stream, done)
        try:
            self._send(Call(gen_id, engine, "generate", (model_id, prompt, params)))
        except OSError:
            self._streams.pop(gen_id, None)
            raise self._gone() from None
        return stream

    def _cancel(self, gen_id: int) -> None:
        if self.alive and gen_id in self._streams:
            with contextlib.suppress(OSError):
                self._send(Cancel(gen_id))

    # -- frames (on the loop) ----------------------------------------------------------------

    def _receive_safely(self, message: object) -> None:
        try:
            self._receive(message)
        except Exception:  # our bug, not the worker's: keep reading
            log.exception("handling a worker frame failed", extra={"device": self.device})

    def _closed(self, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, (EOFError, ConnectionError)):
            log.error("bad frame from worker", extra={"device": self.device, "error": repr(error)})
            self.kill()  # an unreadable frame: the worker cannot be trusted
        self._losing = asyncio.ensure_future(self._lost())

    def _receive(self, message: object) -> None:
        if isinstance(message, Output):
            self.output_frames += 1
            self.last_output = time.monotonic()
            self._output(message)
        elif isinstance(message, Reply):
            self._reply(message)
        elif isinstance(message, Pong):
            self.last_pong = time.monotonic()
        elif isinstance(message, Snapshot):
            self.snapshot = message
            self.on_snapshot(message)
        elif isinstance(message, Ready) and self._started and not self._started.done():
            self._started.set_result(message)

    def _reply(self, reply: Reply) -> None:
        waiter = self._calls.pop(reply.id, None)
        if waiter is not None:
            if waiter.done():
                return
            if reply.error is None:
                waiter.set_result(reply.value)
            else:
                waiter.set_exception(exception_of(reply.error))
        elif reply.error is not None:  # a generate the worker could not start
            self._end(reply.id, reply.error)

    def _output(self, output: Output) -> None:
        for gen_id, pieces in output.pieces.items():
            entry = self._streams.get(gen_id)
            if entry is not None:
                entry[0].deliver(pieces)
        for gen_id, end in output.ends.items():
            self._end(gen_id, end)

    def _end(self, gen_id: int, end: Finish | Failure) -> None:
        entry = self._streams.pop(gen_id, None)
        if entry is None or entry[1].done():
            return
        if isinstance(end, Failure):
            entry[1].set_exception(exception_of(end))
        else:
            entry[1].set_result(end)

    async def _lost(self) -> None:
        """The worker's end closed: reap it, fail what it had, tell the supervisor."""
        if not self.alive:
            return
        self.alive = False
        returncode = None
        if self.proc is not None:
            try:
                returncode = await asyncio.to_thread(self.proc.wait, 5)
            except subprocess.TimeoutExpired:
                self.kill("its connection to the neuron closed, and it did not exit")
                returncode = await asyncio.to_thread(self.proc.wait)
        reason = describe_exit(self.device, self.pid, returncode)
        if self.kill_reason:
            reason = f"{reason}: {self.kill_reason}"
        if self.lost_hint and returncode:
            reason = f"{reason}; {self.lost_hint}"
        crash = EngineCrashed(reason)
        for waiter in self._calls.values():
            if not waiter.done():
                waiter.set_exception(crash)
        self._calls.clear()
        for _stream, done in self._streams.values():
            if not done.done():
                done.set_exception(crash)
        self._streams.clear()
        if self._started is not None and not self._started.done():
            self._started.set_exception(crash)
        if self.frames is not None and self.frames.transport is not None:
            self.frames.transport.close()
        if not self.stopping:
            self.on_lost(reason, list(self.tail))

    def _relay_output(self, fd: int) -> None:
        """The worker's stdout and stderr, into the neuron's own log stream, line by line
        (its log lines, llama.cpp's, a fault's stack), the last ones kept for the report."""
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.tail.append(line)
                try:
                    sys.stderr.write(line + "\n")
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass


class Frames(asyncio.Protocol):
    """The neuron's end of the socket pair, on its event loop: non-blocking, buffered both
    ways. Frames are ``multiprocessing.connection``'s (a big-endian length, then the pickle),
    so the worker's plain blocking ``Connection`` reads and writes the same bytes."""

    def __init__(
        self,
        on_message: Callable[[object], None],
        on_closed: Callable[[BaseException | None], None],
    ) -> None:
        self.on_message = on_message
        self.on_closed = on_closed
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def send(self, message: object) -> None:
        assert self.transport is not None
        payload = ForkingPickler.dumps(message)
        size = len(payload)
        header = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
        self.transport.write(header + bytes(payload))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (size,) = struct.unpack_from("!i", self.buffer)
            head = 4
            if size == -1:
                if len(self.buffer) < 12:
                    return
                (size,) = struct.unpack_from("!Q", self.buffer, 4)
                head = 12
            if len(self.buffer) < head + size:
                return
            payload = bytes(self.buffer[head : head + size])
            del self.buffer[: head + size]
            try:
                message = pickle.loads(payload)
            except Exception as exc:  # an unreadable frame: close, and say why
                self.error = exc
                assert self.transport is not None
                self.transport.close()
                return
            self.on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_closed(self.error or exc)
