"""One worker process per device, kept running: started with the neuron, restarted (with
back-off) when one dies, its models reloaded; recycled when its last model is unloaded, so
every byte it held goes back to the OS and the driver.

The supervisor also keeps the book of which model lives on which worker (``Resident``) and
the last ``Snapshot`` each worker sent, so the neuron's status queries never wait on a
worker. Decisions are the pure functions of ``recovery``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from helexa.core.errors import ApiError, model_not_found, unavailable
from helexa.core.wire import ModelSpec, ModelStatus, WorkerHealth
from helexa.neuron.config import NeuronSettings
from helexa.neuron.devices import CPU, cuda_key
from helexa.neuron.harness.base import EngineCrashed, PreparedPrompt, TokenStream
from helexa.neuron.sampling import SamplingParams
from helexa.neuron.worker import recovery
from helexa.neuron.worker.parent import WorkerProcess
from helexa.neuron.worker.protocol import Init, Snapshot, spec_for_worker

log = logging.getLogger("helexa.neuron.worker")

MB = 1024 * 1024
RETRY_AFTER_S = 5


@dataclass
class Resident:
    """A model the neuron wants on a device's worker."""

    spec: ModelSpec
    engine: str
    device: str
    state: Literal["loading", "loaded", "failed"] = "loading"
    error: str | None = None
    strikes: int = 0  # crashes of its worker while it was there
    reload: asyncio.Future[ModelStatus] | None = None  # a recovery's reload of it
    planned: bool = False  # that reload follows a recycle, not a crash: requests wait for it


@dataclass
class Device:
    key: str
    index: int | None  # the CUDA index; None for the CPU
    host: str = ""  # the device it runs on ("cpu", "cuda:N"): its key, but for a pooled model
    pooled: str | None = None  # the pooled model (on remote devices too) it alone holds
    proc: WorkerProcess | None = None
    state: Literal["starting", "ready", "restarting", "down"] = "starting"
    up: asyncio.Future[WorkerProcess] | None = None
    started_at: float = 0.0
    restarts: int = 0
    crashes: int = 0  # consecutive (recovery.consecutive)
    last_exit: str | None = None
    busy: int = 0  # load/unload/recycle calls under way
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.host = self.host or self.key


class Workers:
    def __init__(
        self,
        settings: NeuronSettings,
        engines: list[str],
        cuda_indices: list[int],
        cpu_budget_bytes: int,
    ) -> None:
        self.settings = settings
        self.engines = engines
        self.cuda_indices = cuda_indices
        self.cpu_budget_bytes = cpu_budget_bytes
        self.devices: dict[str, Device] = {CPU: Device(CPU, None)}
        for index in cuda_indices:
            self.devices[cuda_key(index)] = Device(cuda_key(index), index)
        self.residents: dict[str, Resident] = {}
        # Bytes of a device lent to other hosts (lending.Lender): a load here cannot use them.
        self.lent: Callable[[str], int] = lambda _key: 0
        self.closing = False  # draining: an emptied worker is not replaced
        self.stopping = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for device in self.devices.values():
            self._launch(device)

    async def stop(self) -> None:
        self.stopping = True
        for device in self.devices.values():
            for task in list(device.tasks):
                task.cancel()
        await asyncio.gather(
            *(d.proc.stop() for d in self.devices.values() if d.proc is not None),
            return_exceptions=True,
        )

    def _launch(self, device: Device, delay_s: float = 0.0) -> None:
        """Start ``device``'s worker (after ``delay_s``); ``device.up`` resolves to it."""
        loop = asyncio.get_running_loop()
        device.up = loop.create_future()
        device.up.add_done_callback(_consume)
        self._spawn(device, self._start(device, delay_s))

    def _spawn(self, device: Device, job: Any) -> None:
        task = asyncio.ensure_future(job)
        device.tasks.add(task)
        task.add_done_callback(device.tasks.discard)

    async def _start(self, device: Device, delay_s: float) -> None:
        assert device.up is not None
        if delay_s:
            await asyncio.sleep(delay_s)
        proc = WorkerProcess(
            device.key,
            on_snapshot=lambda snap: self._on_snapshot(device, proc, snap),
            on_lost=lambda reason, tail: self._on_lost(device, proc, reason, tail),
            lost_hint=self._pool_hint(device),
            stall_timeout_s=self.settings.rpc.stall_timeout_s if device.pooled else None,
        )
        device.proc = proc
        try:
            ready = await proc.start(self._init(device), self._env(device), self._start_timeout())
        except Exception as exc:
            proc.stopping = True  # its end is reported here, not as a crash
            proc.kill()
            if not isinstance(exc, EngineCrashed):
                log.exception("worker start failed", extra={"device": device.key})
                exc = EngineCrashed(f"the {device.key} worker failed to start: {exc!r}")
            if device.pooled is not None:  # its load reports it; a pooled worker is not retried
                device.up.set_exception(crashed(str(exc)))
                return
            # Died before it could serve: a broken install or device. Bounded, like crashes.
            device.crashes += 1
            device.last_exit = str(exc)
            if device.crashes > self.settings.workers.max_restarts:
                device.state = "down"
                log.error("worker cannot start", extra={"device": device.key, "error": str(exc)})
                device.up.set_exception(
                    unavailable(
                        f"the {device.key} worker cannot start: {exc}",
                        code="worker_unavailable",
                        retry_after=60,
                    )
                )
                return
            delay = recovery.backoff_s(device.crashes, base_s=self._backoff())
            log.warning(
                "worker start failed; retrying",
                extra={"device": device.key, "error": str(exc), "retry_in_s": delay},
            )
            self._spawn(device, self._start(device, delay))
            return
        device.state = "ready"
        device.started_at = time.monotonic()
        workers = self.settings.workers
        self._spawn(device, proc.watch(workers.heartbeat_s, workers.heartbeat_timeout_s))
        log.info(
            "worker started",
            extra={"device": device.key, "pid": ready.pid, "startup_s": ready.startup_s},
        )
        device.up.set_result(proc)

    def _pool_hint(self, device: Device) -> str | None:
        resident = self.residents.get(device.pooled or "")
        if resident is None or not resident.spec.rpc:
            return None
        remotes = ", ".join(r.endpoint for r in resident.spec.rpc)
        return (
            f"it held pooled model {device.pooled!r}, whose worker ends when a donor's RPC "
            f"server ({remotes}) goes away"
        )

    def _init(self, device: Device) -> Init:
        pooled = self.residents.get(device.pooled or "")
        return Init(
            settings=self.settings.model_dump(),
            # A pooled model's worker builds its engine only (no torch import for llama.cpp).
            engines=(pooled.engine,) if pooled is not None else tuple(self.engines),
            device=device.host,
            cpu_budget_bytes=self.cpu_budget_bytes if device.host == CPU else 0,
        )

    def _env(self, device: Device) -> dict[str, str]:
        """The worker sees its own GPU only (as cuda:0), and the CPU worker none."""
        env = dict(os.environ)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the indices NVML reports
        env["CUDA_VISIBLE_DEVICES"] = "" if device.index is None else str(device.index)
        return env

    def _start_timeout(self) -> float:
        return self.settings.workers.start_timeout_s

    def _backoff(self) -> float:
        return self.settings.workers.restart_backoff_s

    async def worker(self, key: str) -> WorkerProcess:
        device = self.devices[key]
        if device.state == "down":  # a later load tries again from scratch
            device.crashes = 0
            device.state = "starting"
            self._launch(device)
        assert device.up is not None
        return await asyncio.shield(device.up)

    # -- what a worker tells ------------------------------------------------------------------

    def _on_snapshot(self, device: Device, proc: WorkerProcess, snap: Snapshot) -> None:
        if snap.poisoned and device.proc is proc and proc.kill_reason is None:
            # A device fault (CUDA error, NaN flood) leaves the worker's device state
            # untrusted: end the process and start afresh, as after a crash.
            log.error("device fault: recycling its worker", extra={"device": device.key})
            proc.kill(f"a device fault on {device.key}: {snap.poisoned}")

    def _on_lost(self, device: Device, proc: WorkerProcess, reason: str, tail: list[str]) -> None:
        if device.proc is not proc or self.stopping:
            return
        if device.pooled is not None:
            self._pool_lost(device, reason, tail)
            return
        uptime = time.monotonic() - device.started_at
        device.crashes = recovery.consecutive(device.crashes, uptime)
        device.restarts += 1
        device.last_exit = reason
        device.state = "restarting"
        mine = [r for r in self.residents.values() if r.device == device.key]
        wanted = [r for r in mine if r.state != "failed" or r.reload is not None]
        blamed = recovery.struck(
            [r.spec.model_id for r in wanted if r.state == "loaded"],
            [r.spec.model_id for r in wanted if r.state == "loading"],
        )
        for resident in wanted:
            if uptime >= recovery.STABLE_S:
                resident.strikes = 0  # it served a while: a crash loop this is not
            if resident.spec.model_id in blamed:
                resident.strikes += 1
        _again, given_up = recovery.to_reload(
            [recovery.Strikes(r.spec.model_id, r.strikes) for r in wanted],
            self.settings.workers.max_restarts,
        )
        for resident in wanted:
            resident.state = "failed"
            resident.planned = False
            resident.error = f"engine_crashed: {reason}"
            if resident.spec.model_id in given_up:
                resident.error = recovery.gave_up(reason, resident.strikes)
                self._settle_reload(resident, crashed(resident.error))
            elif resident.reload is None:
                resident.reload = self._waiter()
        log.error(
            "worker crashed",
            extra={
                "device": device.key,
                "reason": reason,
                "models": ",".join(r.spec.model_id for r in mine) or None,
                "not_reloaded": ",".join(given_up) or None,
                "last_lines": "\n".join(tail[-12:]) or None,
            },
        )
        delay = recovery.backoff_s(device.crashes, base_s=self._backoff())
        self._launch(device, delay)
        self._spawn(device, self._recover(device))

    def _pool_lost(self, device: Device, reason: str, tail: list[str]) -> None:
        """A pooled model's worker ended: most often a donor went away (ggml's RPC client
        aborts). Its requests have failed already; the model is unloaded here (not reloaded:
        its donors may be gone), so cortex plans it afresh on the next request."""
        self.devices.pop(device.key, None)
        resident = self.residents.pop(device.pooled or "", None)
        log.error(
            "pooled model lost",
            extra={
                "model_id": device.pooled,
                "device": device.key,
                "reason": reason,
                "rpc": ",".join(r.endpoint for r in resident.spec.rpc or []) if resident else None,
                "last_lines": "\n".join(tail[-12:]) or None,
            },
        )
        if resident is not None:
            self._settle_reload(resident, crashed(reason))

    @staticmethod
    def _waiter() -> asyncio.Future[ModelStatus]:
        waiter: asyncio.Future[ModelStatus] = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(_consume)
        return waiter

    async def _recover(self, device: Device) -> None:
        """Reload what the old worker held (``Resident.reload`` set), once the new one is up."""
        assert device.up is not None
        pending = [
            r for r in self.residents.values() if r.device == device.key and r.reload is not None
        ]
        try:
            await asyncio.shield(device.up)
        except ApiError as exc:  # the device is down: its models stay failed
            for resident in pending:
                resident.error = f"{exc.code}: {exc.message}"
                self._settle_reload(resident, exc)
            return
        for resident in pending:
            if self.residents.get(resident.spec.model_id) is not resident:
                continue  # unloaded meanwhile
            resident.state = "loading"
            try:
                status = await self._load_on(device, resident)
            except EngineCrashed:
                return  # that crash settled the books and started the next recovery
            except ApiError as exc:
                resident.state = "failed"
                resident.error = f"{exc.code}: {exc.message}"
                self._settle_reload(resident, exc)
                log.error(
                    "reload failed",
                    extra={"model_id": resident.spec.model_id, "error": exc.message},
                )
                continue
            self._settle_reload(resident, status)
            log.info(
                "model reloaded", extra={"model_id": resident.spec.model_id, "device": device.key}
            )

    @staticmethod
    def _settle_reload(resident: Resident, outcome: ModelStatus | BaseException) -> None:
        waiter, resident.reload = resident.reload, None
        resident.planned = False
        if waiter is None or waiter.done():
            return
        if isinstance(outcome, ModelStatus):
            waiter.set_result(outcome)
        else:
            waiter.set_exception(outcome)

    # -- loads -------------------------------------------------------------------------------

    async def load(self, engine: str, spec: ModelSpec, free_mb: Mapping[str, int]) -> ModelStatus:
        resident = self.residents.get(spec.model_id)
        if resident is not None:
            if resident.reload is not None:  # a recovery is bringing it back: join it
                return await asyncio.shield(resident.reload)
            if resident.state != "failed":
                raise ApiError(
                    409, f"model {spec.model_id!r} is already here", code="model_loading"
                )
            del self.residents[spec.model_id]  # failed: a load by hand starts it over
        order = recovery.load_order(spec.devices, spec.tensor_parallel, self.cuda_indices, free_mb)
        if spec.rpc:
            return await self._load_pooled(engine, spec, order[0])
        refused: ApiError | None = None
        for key in order:
            device = self.devices[key]
            resident = Resident(spec=spec, engine=engine, device=key)
            self.residents[spec.model_id] = resident
            try:
                return await self._load_on(device, resident)
            except ApiError as exc:
                if self.residents.get(spec.model_id) is resident:
                    del self.residents[spec.model_id]
                if exc.code not in ("insufficient_memory", "model_too_large"):
                    raise
                refused = refused or exc  # the best device's reason
            except EngineCrashed as exc:
                raise crashed(str(exc)) from exc
        assert refused is not None
        raise refused

    async def _load_pooled(self, engine: str, spec: ModelSpec, host: str) -> ModelStatus:
        """A model on remote devices too gets a worker of its own on ``host``: ggml's RPC
        client aborts its process when a donor goes away, which must not take other models
        down with it."""
        index = None if host == CPU else int(host.split(":")[1])
        device = Device(f"pool:{spec.model_id}", index, host=host, pooled=spec.model_id)
        resident = Resident(spec=spec, engine=engine, device=device.key)
        self.residents[spec.model_id] = resident
        self.devices[device.key] = device
        self._launch(device)
        try:
            return await self._load_on(device, resident)
        except BaseException as exc:
            if self.residents.get(spec.model_id) is resident:
                del self.residents[spec.model_id]
            if self.devices.get(device.key) is device:
                del self.devices[device.key]
            if device.proc is not None:
                device.proc.stopping = True
                await device.proc.stop()
            if isinstance(exc, EngineCrashed):
                raise crashed(str(exc)) from exc
            raise

    def _outside(self, device: Device) -> int:
        """Bytes of ``device``'s host taken by others than its worker: lent, and on the CPU
        the other workers' models (pooled models' workers share a device with its own
        worker; a GPU's free memory, read from the driver, shows theirs already)."""
        if device.host != CPU:
            return self.lent(device.host)
        others = sum(
            self._device_bytes(d)
            for d in self.devices.values()
            if d.host == device.host and d is not device
        )
        return self.lent(device.host) + others

    def _device_bytes(self, device: Device) -> int:
        snap = device.proc.snapshot if device.proc is not None else None
        return sum(v.memory_bytes for v in snap.engines.values()) if snap is not None else 0

    async def _load_on(self, device: Device, resident: Resident) -> ModelStatus:
        proc = await self.worker(device.key)
        device.busy += 1
        try:
            worker_key = CPU if device.host == CPU else cuda_key(0)  # as the worker sees it
            await proc.call("", "hold", worker_key, self._outside(device))
            status = await proc.call(
                resident.engine, "load", spec_for_worker(resident.spec, device.host)
            )
        finally:
            device.busy -= 1
        if self.residents.get(resident.spec.model_id) is resident:
            resident.state = "loaded"
            resident.error = None
        return self._as_host(device, status)

    async def unload(self, model_id: str) -> None:
        resident = self.residents.get(model_id)
        if resident is None:
            raise model_not_found(model_id)
        if resident.reload is not None:
            with contextlib.suppress(ApiError, EngineCrashed):
                await asyncio.shield(resident.reload)
        device = self.devices[resident.device]
        self.residents.pop(model_id, None)
        if device.pooled is not None:  # its own worker: ending it ends the RPC connections
            self.devices.pop(device.key, None)
            if device.proc is not None:
                device.proc.stopping = True
                await device.proc.stop()
            return
        if resident.state == "loaded" and device.proc is not None and device.proc.alive:
            device.busy += 1
            try:
                await device.proc.call(resident.engine, "unload", model_id)
            except EngineCrashed:
                pass  # its memory went with the process
            finally:
                device.busy -= 1
        emptied = not any(r.device == device.key for r in self.residents.values())
        if emptied and not device.busy and not self.closing:
            await self.recycle(device.key, why="its last model was unloaded")

    async def recycle(self, key: str, *, why: str) -> bool:
        """End ``key``'s worker and start a fresh one, reloading what it holds: every byte
        the old one kept (allocator caches, fragments) goes back. Only while it is idle;
        False when it is not."""
        device = self.devices[key]
        proc = device.proc
        if proc is None or device.state != "ready" or proc.in_flight() or device.busy:
            return False
        if device.pooled is not None:  # its donors hold the rest: a reload would re-send it
            return False
        mine = [r for r in self.residents.values() if r.device == key and r.state == "loaded"]
        device.state = "restarting"
        device.restarts += 1
        log.info(
            "worker recycled",
            extra={"device": key, "why": why, "models": ",".join(r.spec.model_id for r in mine)},
        )
        for resident in mine:
            resident.state = "loading"  # reloaded by the recovery below, without a strike
            resident.planned = True
            resident.reload = self._waiter()
        await proc.stop()
        self._launch(device)
        self._spawn(device, self._recover(device))
        return True

    async def settled(self, key: str) -> None:
        """Until the reloads on ``key``'s worker (after a recycle or a crash) are over."""
        waiting = [
            r.reload for r in self.residents.values() if r.device == key and r.reload is not None
        ]
        await asyncio.gather(*(asyncio.shield(w) for w in waiting), return_exceptions=True)

    # -- calls on a model --------------------------------------------------------------------

    def resident(self, model_id: str) -> Resident:
        resident = self.residents.get(model_id)
        if resident is None:
            raise model_not_found(model_id)
        if resident.state != "loaded":
            if resident.reload is not None or resident.state == "loading":
                raise unavailable(
                    f"model {model_id!r} is being reloaded: {resident.error or 'loading'}",
                    code="model_reloading",
                    retry_after=RETRY_AFTER_S,
                )
            raise crashed(resident.error or "its worker crashed")
        return resident

    def proc_of(self, resident: Resident) -> WorkerProcess:
        proc = self.devices[resident.device].proc
        if proc is None or not proc.alive:
            raise crashed(f"the {resident.device} worker is restarting")
        return proc

    async def call(self, model_id: str, method: str, *args: Any) -> Any:
        waiting = self.residents.get(model_id)
        if waiting is not None and waiting.planned and waiting.reload is not None:
            # A recycle, not a failure: the model is back in seconds, so wait for it.
            async with asyncio.timeout(self._start_timeout()):
                await asyncio.shield(waiting.reload)
        resident = self.resident(model_id)
        try:
            return await self.proc_of(resident).call(resident.engine, method, model_id, *args)
        except EngineCrashed as exc:
            raise crashed(str(exc)) from exc

    def generate(
        self, model_id: str, prompt: PreparedPrompt, params: SamplingParams
    ) -> TokenStream:
        resident = self.resident(model_id)
        return self.proc_of(resident).generate(resident.engine, model_id, prompt, params)

    async def size(self, engine: str, spec: ModelSpec, free_mb: Mapping[str, int]) -> Any:
        """What loading ``spec`` would take, asked of the worker it would go to first (the
        dtype, and so the size, depends on the device)."""
        key = recovery.load_order(spec.devices, spec.tensor_parallel, self.cuda_indices, free_mb)[0]
        proc = await self.worker(key)
        try:
            return await proc.call(engine, "size", spec_for_worker(spec, key))
        except EngineCrashed as exc:
            raise crashed(str(exc)) from exc

    # -- views -------------------------------------------------------------------------------

    def _as_host(self, device: Device, status: ModelStatus) -> ModelStatus:
        """A worker's view of a model, in the host's device numbering."""
        return status.model_copy(update={"devices": [] if device.index is None else [device.index]})

    def statuses(self, engine: str) -> list[ModelStatus]:
        out: list[ModelStatus] = []
        for resident in self.residents.values():
            if resident.engine != engine:
                continue
            device = self.devices[resident.device]
            status = self._reported(device, engine, resident.spec.model_id)
            if resident.state == "loaded" and status is not None:
                out.append(self._as_host(device, status))
            elif resident.state == "failed" or resident.reload is not None:
                out.append(
                    ModelStatus(
                        id=resident.spec.model_id,
                        harness=engine,
                        status=resident.state,
                        devices=[] if device.index is None else [device.index],
                        vram_used_mb=0,
                        context_length=None,
                        error=resident.error,
                    )
                )
        return out

    def _reported(self, device: Device, engine: str, model_id: str) -> ModelStatus | None:
        view = self._view(device, engine)
        if view is None:
            return None
        return next((m for m in view.models if m.id == model_id), None)

    def _view(self, device: Device, engine: str) -> Any:
        proc = device.proc
        if proc is None or proc.snapshot is None:
            return None
        return proc.snapshot.engines.get(engine)

    def loading(self, engine: str) -> dict[str, str]:
        return {  # where each load is going, as the host names it (a pooled worker's device)
            r.spec.model_id: self.devices[r.device].host
            for r in self.residents.values()
            if r.engine == engine and r.state == "loading" and r.reload is None
        }

    def memory_used_bytes(self, engine: str, key: str) -> int:
        """Bytes ``engine`` holds on device ``key``, in every worker running there."""
        views = [self._view(d, engine) for d in self.devices.values() if d.host == key]
        return sum(v.memory_bytes for v in views if v is not None)

    def figure(self, engine: str, model_id: str, kind: str) -> Any:
        resident = self.residents.get(model_id)
        if resident is None or resident.state != "loaded":
            return None
        view = self._view(self.devices[resident.device], engine)
        return None if view is None else getattr(view, kind).get(model_id)

    def has(self, engine: str, model_id: str) -> bool:
        resident = self.residents.get(model_id)
        return (
            resident is not None
            and resident.engine == engine
            and (resident.state != "loading" or resident.reload is not None)
        )

    def health(self) -> list[WorkerHealth]:
        return [
            WorkerHealth(
                device=d.key,
                pid=d.proc.pid if d.proc is not None and d.proc.alive else None,
                state=d.state,
                restarts=d.restarts,
                startup_s=d.proc.ready.startup_s if d.proc and d.proc.ready else None,
                last_exit=d.last_exit,
                in_flight=d.proc.in_flight() if d.proc is not None else 0,
                output_frames=d.proc.output_frames if d.proc is not None else 0,
            )
            for d in self.devices.values()
        ]


def crashed(reason: str) -> ApiError:
    """503 ``engine_crashed``: transient, the neuron is bringing the worker back."""
    text = reason.removeprefix("engine_crashed: ")
    return unavailable(f"engine crashed: {text}", code="engine_crashed", retry_after=RETRY_AFTER_S)


def _consume(future: asyncio.Future[Any]) -> None:
    """Read a future's exception so an unawaited failure is not logged as lost."""
    if not future.cancelled():
        future.exception()
