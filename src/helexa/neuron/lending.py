"""Devices this neuron lends to other hosts' models (docs/pooling.md).

``POST /rpc/lend`` starts a donor process (``harness/llamacpp/donor.py``: ggml's RPC server
on loopback, the gate on the fleet address admitting the borrower only) and reserves the
memory lent, so ``/health`` and this neuron's own loads count it as taken. A loan ends when
cortex releases it, when its borrower has been disconnected ``idle_grace_s`` (it unloaded
the model, crashed, or went away), when the borrower never connects, or when the donor
process dies; its process is stopped and the memory is back. When a loan ends is decided by
``loan_over`` (pure).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from helexa.core.auth import is_loopback
from helexa.core.errors import ApiError, bad_request, unavailable
from helexa.core.wire import LendRequest, Loan
from helexa.neuron.config import NeuronSettings
from helexa.neuron.devices import CPU, cuda_key
from helexa.neuron.rpc_gate import normalized, resolve

log = logging.getLogger("helexa.neuron.lending")

MB = 1024 * 1024
DONOR_MODULE = "helexa.neuron.harness.llamacpp.donor"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
TICK_S = 0.5


@dataclass
class Activity:
    """What the gate reported of a loan's connections: what ``loan_over`` decides on."""

    started: float
    connections: int = 0
    ever_connected: bool = False
    idle_since: float | None = None
    exited: str | None = None  # how the donor process ended


def loan_over(activity: Activity, now: float, *, grace_s: float, connect_s: float) -> str | None:
    """Why a loan is over (None: it goes on)."""
    if activity.exited is not None:
        return f"the donor process ended ({activity.exited})"
    if activity.connections:
        return None
    if not activity.ever_connected:
        if now - activity.started > connect_s:
            return f"the borrower did not connect within {connect_s:g} s"
        return None
    if activity.idle_since is not None and now - activity.idle_since > grace_s:
        return f"the borrower has been disconnected {grace_s:g} s"
    return None


def every_interface(host: str) -> bool:
    """Whether binding ``host`` listens on every interface (``0.0.0.0``, ``::``, ``0``...)."""
    if host in ("", "*"):
        return True
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return False  # a host name: that host's addresses
    return any(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_unspecified for i in infos)


def lend_host(settings: NeuronSettings) -> str:
    """The fleet address gates listen on: ``[rpc] host``, else the neuron's own address.
    Never a wildcard: an RPC port on every interface is what this design exists to avoid."""
    host = (settings.rpc.host if settings.rpc.host is not None else settings.host).strip("[]")
    if every_interface(host):
        raise ApiError(
            409,
            f"this neuron listens on {host!r}, every interface: set [rpc] host in neuron.toml "
            "to the one address fleet traffic should use before it lends a device",
            code="lending_disabled",
        )
    return host


def allowlist(request: LendRequest, host: str) -> list[str]:
    """The addresses a loan on the gate at ``host`` admits: the borrower's (resolved) and
    any named with it. Blocking (name resolution): run it off the event loop."""
    extra = []
    for address in request.allow:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise bad_request(f"allow: {address!r} is not an IP address", param="allow") from None
        if ip.is_unspecified:
            raise bad_request("allow: a wildcard address admits anyone", param="allow")
        extra.append(normalized(str(ip)))
    resolved = resolve(request.borrower)
    if not resolved:
        raise bad_request(
            f"the borrower {request.borrower!r} does not resolve to an address", param="borrower"
        )
    loopback = all(ipaddress.ip_address(a).is_loopback for a in resolved)
    if loopback and not extra and not is_loopback(host):
        # cortex named the borrower by a loopback URL (it runs beside it): from here that
        # is this host, never the borrower. Admitting it would refuse the borrower.
        raise ApiError(
            409,
            f"the borrower {request.borrower!r} is a loopback address, and this neuron lends "
            f"on {host}: name that neuron in cortex.toml by its fleet address",
            code="borrower_unreachable",
            param="borrower",
        )
    return sorted(set(resolved) | set(extra))


@dataclass
class Lent:
    loan: Loan
    activity: Activity
    proc: asyncio.subprocess.Process
    events: asyncio.StreamReader  # the donor's JSON lines
    pipe: asyncio.BaseTransport
    reader: asyncio.Task[None] | None = None


class Lender:
    def __init__(
        self,
        settings: NeuronSettings,
        cuda_indices: list[int],
        room_mb: Callable[[str], int],
        gpu_used_mb: Callable[[int, int], int] = lambda _index, _pid: 0,
    ) -> None:
        self.settings = settings
        self.cuda_indices = cuda_indices
        self._room_mb = room_mb  # free MB of a device key for a new loan (loans not counted)
        self._gpu_used_mb = gpu_used_mb  # (CUDA index, pid) -> MB that process holds there
        self.loans: dict[str, Lent] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._starting: dict[str, int] = {}  # device key -> MB of loans being set up

    # -- reading -----------------------------------------------------------------------------

    def lent_mb(self, key: str) -> int:
        held = sum(lent.loan.mb for lent in self.loans.values() if lent.loan.device == key)
        return held + self._starting.get(key, 0)

    def held_mb(self, key: str) -> int:
        """MB of a device the loans still hold outside what its free figure shows: on the
        CPU (a budget, not measured) all of it; on a GPU, what the donor processes have not
        allocated yet (the driver's free figure shows the rest already)."""
        if key == CPU:
            return self.lent_mb(key)
        index = int(key.split(":")[1])
        loans = [lent for lent in self.loans.values() if lent.loan.device == key]
        return self._starting.get(key, 0) + sum(
            max(lent.loan.mb - self._gpu_used_mb(index, lent.proc.pid), 0) for lent in loans
        )

    def held_bytes(self, key: str) -> int:
        return self.held_mb(key) * MB

    def views(self) -> list[Loan]:
        now = time.monotonic()
        return [
            lent.loan.model_copy(update={"age_s": round(now - lent.activity.started, 1)})
            for lent in self.loans.values()
        ]

    # -- lending -----------------------------------------------------------------------------

    async def lend(self, request: LendRequest) -> Loan:
        if not self.settings.rpc.lend:
            raise ApiError(409, "this neuron lends no device ([rpc] lend = false)",
                           code="lending_disabled")  # fmt: skip
        host = lend_host(self.settings)
        key = CPU if request.device is None else cuda_key(request.device)
        if request.device is not None and request.device not in self.cuda_indices:
            raise bad_request(
                f"no CUDA device {request.device} on this host (have {self.cuda_indices}); "
                "device: null is the CPU",
                param="device",
                code="no_such_device",
            )
        allowed = await asyncio.to_thread(allowlist, request, host)
        room = self._room_mb(key) - self.held_mb(key)
        if request.mb > room:
            raise ApiError(
                409,
                f"cannot lend {request.mb} MB of {key}: {max(room, 0)} MB free",
                code="insufficient_memory",
                param="mb",
            )
        self._starting[key] = self._starting.get(key, 0) + request.mb
        try:
            lent = await self._start(request, key, host, allowed)
        finally:
            self._starting[key] -= request.mb
        self.loans[lent.loan.id] = lent
        lent.reader = asyncio.ensure_future(self._read_events(lent))
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.ensure_future(self._tick())
        log.info(
            "lend",
            extra={
                "loan": lent.loan.id,
                "device": key,
                "mb": request.mb,
                "model": request.model_id,
                "borrower": request.borrower,
                "allow": ",".join(allowed),
                "endpoint": lent.loan.endpoint,
            },
        )
        return lent.loan

    async def _start(self, request: LendRequest, key: str, host: str, allowed: list[str]) -> Lent:
        rpc = self.settings.rpc
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = "" if request.device is None else str(request.device)
        threads = self.settings.harness.llamacpp.threads or self.settings.cpu.threads or 0
        argv = [
            sys.executable, "-m", DONOR_MODULE,
            "--device", "cpu" if request.device is None else "gpu",
            "--host", host,
            "--ports", f"{rpc.ports[0]}-{rpc.ports[1]}",
            "--allow", ",".join(allowed),
            "--threads", str(threads),
            "--events-fd", str(write_fd),
            "--log-level", self.settings.log_level,
        ]  # fmt: skip
        if rpc.cache_dir is not None:
            argv += ["--cache-dir", str(rpc.cache_dir)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                pass_fds=(write_fd,),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,  # ggml's own banner and per-client chatter
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        events = os.fdopen(read_fd, "rb", buffering=0)
        reader = asyncio.StreamReader()
        transport: asyncio.BaseTransport | None = None
        try:
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), events
            )
            try:
                async with asyncio.timeout(READY_TIMEOUT_S):
                    first = orjson.loads(await reader.readline() or b"{}")
            except (TimeoutError, orjson.JSONDecodeError):
                first = {}
            if not isinstance(first, dict) or first.get("event") != "ready":
                why = first.get("error") if isinstance(first, dict) else None
                raise unavailable(
                    f"the RPC server for {key} did not start: {why or 'it did not say why'}",
                    code="lend_failed",
                    retry_after=5,
                )
        except BaseException:  # refused, or the caller gone: nothing of it may stay
            if transport is not None:
                transport.close()
            else:
                events.close()
            await asyncio.shield(_stop(proc))
            raise
        loan = Loan(
            id=secrets.token_hex(6),
            device=key,
            mb=request.mb,
            model_id=request.model_id,
            borrower=request.borrower,
            allowed=allowed,
            endpoint=f"{_bracketed(str(first['host']))}:{first['port']}",
            state="waiting",
            pid=proc.pid,
        )
        activity = Activity(started=time.monotonic())
        return Lent(loan=loan, activity=activity, proc=proc, events=reader, pipe=transport)

    async def _read_events(self, lent: Lent) -> None:
        try:
            while line := await lent.events.readline():
                event = orjson.loads(line)
                if isinstance(event, dict):
                    self._on_event(lent, event)
        except (orjson.JSONDecodeError, ValueError):
            log.warning("unreadable donor event", extra={"loan": lent.loan.id})
        finally:
            lent.pipe.close()
        code = await lent.proc.wait()
        lent.activity.exited = f"exit status {code}" if code >= 0 else f"signal {-code}"

    def _on_event(self, lent: Lent, event: dict[str, object]) -> None:
        loan, activity = lent.loan, lent.activity
        kind = event.get("event")
        if kind == "connected":
            activity.connections += 1
            activity.ever_connected = True
            activity.idle_since = None
        elif kind == "traffic":  # totals so far, open connections included
            loan.bytes_to_donor = int(event.get("to_server", 0))  # type: ignore[arg-type]
            loan.bytes_to_borrower = int(event.get("to_client", 0))  # type: ignore[arg-type]
            loan.messages = int(event.get("reads_to_client", 0))  # type: ignore[arg-type]
        elif kind == "closed":
            activity.connections = max(activity.connections - 1, 0)
            if not activity.connections:
                activity.idle_since = time.monotonic()
        elif kind in ("failed", "error"):  # the gate could not reach the RPC server
            log.error("rpc relay failed", extra={"loan": loan.id, "error": event.get("error")})
        elif kind == "refused":
            loan.refused += 1
            log.warning(
                "rpc connection refused",
                extra={"loan": loan.id, "peer": event.get("peer"), "allow": ",".join(loan.allowed)},
            )
        loan.connections = activity.connections
        loan.state = (
            "connected"
            if activity.connections
            else "idle"
            if activity.ever_connected
            else "waiting"
        )

    async def _tick(self) -> None:
        rpc = self.settings.rpc
        while self.loans:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for loan_id, lent in list(self.loans.items()):
                why = loan_over(
                    lent.activity, now, grace_s=rpc.idle_grace_s, connect_s=rpc.connect_timeout_s
                )
                if why is not None:
                    await self._end(loan_id, why)

    async def release(self, loan_id: str) -> Loan:
        lent = self.loans.get(loan_id)
        if lent is None:
            raise ApiError(404, f"no loan {loan_id!r} here", code="loan_not_found",
                           type="not_found_error", param="loan_id")  # fmt: skip
        await self._end(loan_id, "released")
        return lent.loan

    async def _end(self, loan_id: str, why: str) -> None:
        lent = self.loans.pop(loan_id, None)
        if lent is None:
            return
        await _stop(lent.proc)
        if lent.reader is not None:
            lent.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await lent.reader
        log.info(
            "loan ended",
            extra={
                "loan": loan_id,
                "device": lent.loan.device,
                "mb": lent.loan.mb,
                "model": lent.loan.model_id,
                "why": why,
                "bytes_to_donor": lent.loan.bytes_to_donor,
                "bytes_to_borrower": lent.loan.bytes_to_borrower,
            },
        )

    async def stop(self) -> None:
        for loan_id in list(self.loans):
            await self._end(loan_id, "the neuron is stopping")
        if self._ticker is not None:
            self._ticker.cancel()


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
