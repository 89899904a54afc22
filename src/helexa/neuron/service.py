"""The neuron itself: hardware, device workers, harnesses, loads, admission, activation."""

from __future__ import annotations

import asyncio
import logging
import time

from helexa.core.errors import ApiError, bad_request, model_not_found, unavailable
from helexa.core.wire import (
    CpuHealth,
    DownloadInfo,
    Health,
    ModelLoadInfo,
    ModelSize,
    ModelSpec,
    ModelStatus,
    StoredModel,
)
from helexa.neuron.activation import ActivationTracker, prewarm
from helexa.neuron.admission import Admission
from helexa.neuron.config import NeuronSettings
from helexa.neuron.device_thread import WorkerPoisoned
from helexa.neuron.devices import CPU, cuda_key
from helexa.neuron.discovery import MB, Hardware, total_memory_bytes
from helexa.neuron.downloads import Downloads
from helexa.neuron.engines import Engines, LocalEngines, WorkerEngines
from helexa.neuron.harness.base import Harness
from helexa.neuron.lending import Lender
from helexa.neuron.model_files import (
    REPO_ID,
    canonical_model_id,
    harness_for_files,
    hf_cache_dir,
    hub_offline,
    resolve_local_dir,
)
from helexa.neuron.stored import delete as delete_weights
from helexa.neuron.stored import in_use as weights_in_use
from helexa.neuron.stored import stored as stored_models

log = logging.getLogger("helexa.neuron")

# After the drain deadline's cut (cut_in_flight, with proper error bodies), how long the cut
# generations get to send them; uvicorn's shutdown then allows as long again for the
# connections left before it cancels them (the backstop).
DRAIN_GRACE_S = 5.0


class Neuron:
    def __init__(
        self,
        settings: NeuronSettings,
        hardware: Hardware | None = None,
    ) -> None:
        self.settings = settings
        self.hardware = hardware or Hardware()
        self.started = time.monotonic()
        self.cpu_budget_bytes = (
            settings.cpu.memory_mb * MB
            if settings.cpu.memory_mb
            else int(total_memory_bytes() * 0.8)
        )
        kind = WorkerEngines if settings.workers.isolate else LocalEngines
        self.engines: Engines = kind(settings, self.hardware, self.cpu_budget_bytes)
        self.lender = Lender(
            settings,
            [d.index for d in self.hardware.devices],
            self._room_to_lend_mb,
            self.hardware.process_memory_mb,
        )
        self.engines.count_lent(self.lender.held_bytes)
        transformers_cache = settings.harness.transformers.hf_cache
        self.downloads = Downloads(
            {
                "transformers": hf_cache_dir(transformers_cache),
                "llamacpp": hf_cache_dir(settings.harness.llamacpp.hf_cache or transformers_cache),
            }
        )
        self.harnesses: dict[str, Harness] = self.engines.harnesses
        self.activation = ActivationTracker(settings.default_models)
        self._loads: dict[str, asyncio.Future[ModelStatus]] = {}
        self._admission: dict[str, Admission] = {}
        self.draining = False
        self._drain_began = 0.0
        self._drain_cut: asyncio.TimerHandle | None = None
        self._prewarm: asyncio.Future[None] | None = None
        self._load_specs: dict[str, ModelSpec] = {}

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.engines.start()

    async def stop(self) -> None:
        await self.downloads.stop()
        await self.lender.stop()
        await self.engines.stop()

    def _room_to_lend_mb(self, key: str) -> int:
        """Free MB of a device a loan could take (loans not counted: the lender does)."""
        if key == CPU:
            return (self.cpu_budget_bytes - self.engines.cpu_used()) // MB
        index = int(key.split(":")[1])
        free = {d.index: d.vram_free_mb for d in self.hardware.device_health()}
        return free.get(index, 0)

    def start_prewarm(self) -> None:
        """Called once the listener is bound: /health answers while models load."""
        self._prewarm = asyncio.ensure_future(
            prewarm(self.settings.default_models, self.activation, self.load)
        )

    async def stop_prewarm(self) -> None:
        if self._prewarm is not None and not self._prewarm.done():
            self._prewarm.cancel()
            await asyncio.gather(self._prewarm, return_exceptions=True)

    def harness_of(self, model_id: str) -> Harness:
        for harness in self.harnesses.values():
            if harness.has(model_id):
                return harness
        raise model_not_found(model_id)

    def harness_for(self, spec: ModelSpec) -> Harness:
        harness = self.harnesses.get(spec.harness)
        if harness is None:
            raise bad_request(
                f"unknown harness {spec.harness!r} (this neuron runs: {sorted(self.harnesses)})",
                param="harness",
                code="unknown_harness",
            )
        return harness

    def model_id(self, model_id: str) -> str:
        """The one id a model has on this neuron: every spelling of a local folder (``./x``,
        ``x/.``, ``x//``, ``/abs/models/x``) becomes one (``canonical_model_id``), so it loads
        once and requests find it; repo ids and ids already loaded are kept as they are (the
        filesystem is only asked about other ids)."""
        if model_id in self._loads or any(h.has(model_id) for h in self.harnesses.values()):
            return model_id
        return canonical_model_id(model_id, self.settings.model_dirs)

    def _canonical(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` under the model's one id; a local GGUF (a file, or a folder holding only
        GGUF files) goes to llama.cpp, which transformers could not load anyway."""
        update: dict[str, str] = {}
        model_id = self.model_id(spec.model_id)
        if model_id != spec.model_id:
            update["model_id"] = model_id
        if not any(h.has(model_id) for h in self.harnesses.values()):
            harness = harness_for_files(model_id, spec.harness, self.settings.model_dirs)
            if harness != spec.harness and harness in self.harnesses:
                update["harness"] = harness
        return spec.model_copy(update=update) if update else spec

    async def size(self, spec: ModelSpec) -> ModelSize:
        """What loading ``spec`` would take, from its files; nothing is loaded."""
        spec = self._canonical(spec)
        return await self.harness_for(spec).size(spec)

    async def load(self, spec: ModelSpec) -> tuple[str, ModelStatus]:
        """Load ``spec``; concurrent loads of one id (however spelled) share one attempt."""
        spec = self._canonical(spec)
        if spec.rpc:
            self._check_pooled(spec)
        harness = self.harness_for(spec)
        if not harness.has(spec.model_id) and spec.model_id not in self._loads:
            await self._weights_here(spec)
        if harness.has(spec.model_id):
            status = next(s for s in harness.list() if s.id == spec.model_id)
            if status.status != "failed":  # a failed one (its worker crashed) loads again
                return "already_loaded", status
        pending = self._loads.get(spec.model_id)
        if pending is None:
            if self.draining:  # it would be unloaded again at once, and delay the exit
                raise unavailable(
                    "the neuron is shutting down", code="shutting_down", retry_after=5
                )
            pending = asyncio.ensure_future(self._load_once(harness, spec))
            self._loads[spec.model_id] = pending
            self._load_specs[spec.model_id] = spec
            pending.add_done_callback(lambda _f: self._forget_load(spec.model_id))
        return "loaded", await asyncio.shield(pending)

    def _from_hub(self, spec: ModelSpec) -> bool:
        """Whether a load of ``spec`` takes its weights from the hub (the cache), not from a
        folder or file under model_dirs, and may fetch them (one quant of a GGUF repo)."""
        if not REPO_ID.match(spec.model_id) or hub_offline():
            return False
        if resolve_local_dir(spec.model_id, self.settings.model_dirs) is not None:
            return False
        return spec.harness != "llamacpp" or spec.quant is not None

    async def _weights_here(self, spec: ModelSpec) -> None:
        """A load whose weights are not in the cache starts their download and answers
        503 with its progress, instead of holding the request for the whole download."""
        if not self._from_hub(spec):
            return  # the harness finds (or says what is missing) as before
        pull = self.downloads.pulls.get((spec.model_id, spec.quant))
        if pull is None or pull.state != "downloading":
            args = (spec.model_id, spec.quant, spec.harness)
            if await asyncio.to_thread(self.downloads.present, *args):
                return
            pull = self.downloads.pull(*args)
        raise self.downloads.waiting(pull)

    async def pull(self, spec: ModelSpec) -> DownloadInfo:
        """``POST /models/pull``: download a model's weights (in the background)."""
        spec = self._canonical(spec)
        args = (spec.model_id, spec.quant, spec.harness)
        pulling = self.downloads.pulls.get((spec.model_id, spec.quant))
        idle = pulling is None or pulling.state != "downloading"
        if idle and (
            resolve_local_dir(spec.model_id, self.settings.model_dirs) is not None
            or await asyncio.to_thread(self.downloads.present, *args)
        ):
            return DownloadInfo(model_id=spec.model_id, quant=spec.quant, state="done")
        return self.downloads.pull(*args).view()

    async def stored(self) -> list[StoredModel]:
        return await asyncio.to_thread(
            stored_models, self.downloads.cache_dirs.values(), self.settings.model_dirs
        )

    async def delete(self, model_id: str) -> int:
        """Delete a model's weights from the caches (not while it is loaded or loading)."""
        if model_id in self._loads or any(h.has(model_id) for h in self.harnesses.values()):
            raise weights_in_use(model_id)
        pulling = [p for p in self.downloads.pulls.values() if p.model_id == model_id]
        if any(p.state == "downloading" for p in pulling):
            raise weights_in_use(model_id)
        return await asyncio.to_thread(delete_weights, model_id, self.downloads.cache_dirs.values())

    def _check_pooled(self, spec: ModelSpec) -> None:
        """A pooled load (remote devices) needs llama.cpp, and a worker process of its own:
        ggml's RPC client aborts its process when a donor goes away."""
        if spec.harness != "llamacpp":
            raise bad_request(
                "only GGUF models (llama.cpp) can be pooled over other hosts' devices",
                param="rpc",
                code="unsupported_placement",
            )
        if not self.settings.workers.isolate:
            raise bad_request(
                "a pooled model needs [workers] isolate = true: a lost donor ends its process",
                param="rpc",
                code="unsupported_placement",
            )
        if spec.tensor_parallel or (spec.devices and len(spec.devices) > 1):
            raise bad_request(
                "a pooled model uses one local device (devices: [] or [i]) and the remote ones",
                param="devices",
                code="unsupported_placement",
            )

    def _forget_load(self, model_id: str) -> None:
        self._loads.pop(model_id, None)
        self._load_specs.pop(model_id, None)

    async def _load_once(self, harness: Harness, spec: ModelSpec) -> ModelStatus:
        log.info(
            "load", extra={"model_id": spec.model_id, "harness": spec.harness, "quant": spec.quant}
        )
        try:
            return await harness.load(spec)
        except WorkerPoisoned as exc:
            error = unavailable(str(exc), code="device_poisoned", retry_after=30)
            log.warning(
                "load refused",
                extra={"model_id": spec.model_id, "status": 503, "error": error.message},
            )
            raise error from exc
        except ApiError as exc:
            log.warning(
                "load refused",
                extra={"model_id": spec.model_id, "status": exc.status, "error": exc.message},
            )
            raise

    async def unload(self, model_id: str) -> None:
        model_id = self.model_id(model_id)
        if model_id in self._loads:
            raise ApiError(
                409, f"model {model_id!r} is still loading", code="model_loading", param="model_id"
            )
        harness = self.harness_of(model_id)
        await harness.unload(model_id)
        log.info("unloaded", extra={"model_id": model_id})

    async def unload_all(self) -> None:
        """Unload every model; one failure is logged and the sweep goes on."""
        for harness in self.harnesses.values():
            for status in harness.list():
                try:
                    await harness.unload(status.id)
                    log.info("unloaded", extra={"model_id": status.id})
                except Exception as exc:
                    log.warning("unload failed", extra={"model_id": status.id, "error": str(exc)})

    async def recycle(self, device: str | None) -> list[str]:
        """Recycle the idle device workers (``device``: that one): each ends, and a fresh
        one reloads its models, so memory the old one kept (allocator caches, fragments)
        goes back. A device with generations running is left alone."""
        if device is not None and device not in {w.device for w in self.engines.workers()}:
            raise bad_request(f"no worker for device {device!r}", param="device")
        return await self.engines.recycle(device)

    def admission(self, model_id: str) -> Admission:
        gate = self._admission.get(model_id)
        if gate is None:
            limits = self.settings.admission
            gate = Admission(
                max_concurrent=limits.max_concurrent,
                max_queue=limits.max_queue,
                timeout_s=limits.queue_timeout_s,
                retry_after_s=limits.retry_after_s,
            )
            if self.draining:
                gate.close()
            self._admission[model_id] = gate
        return gate

    def begin_drain(self) -> None:
        """Stop admitting (queued requests get 503 ``shutting_down`` now); what is running
        goes on until ``drain_timeout_s``, when ``cut_in_flight`` ends it."""
        if self.draining:
            return
        self.draining = True
        self.engines.closing()
        self._drain_began = time.monotonic()
        for gate in self._admission.values():
            gate.close()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._drain_cut = loop.call_later(self.settings.drain_timeout_s, self.cut_in_flight)
        log.info(
            "drain started", extra={"in_flight": sum(g.in_flight for g in self._admission.values())}
        )

    def generating(self) -> int:
        """Generations holding a slot (a stream counts until its last byte is sent)."""
        return sum(gate.in_flight for gate in self._admission.values())

    async def drained(self) -> None:
        """The drain phase, run while the listener stays open (``DrainingServer``): /health
        keeps answering ``draining`` so cortex leaves the streams here alone (a closed port
        would read as a dead neuron and cut them), new work gets 503 ``shutting_down``.
        Returns once nothing is generating, or ``DRAIN_GRACE_S`` after the deadline's cut."""
        self.begin_drain()
        limit = self._drain_began + self.settings.drain_timeout_s + DRAIN_GRACE_S
        while self.generating() and time.monotonic() < limit:
            await asyncio.sleep(0.05)
        log.info("drained", extra={"generating": self.generating()})

    def cut_in_flight(self) -> None:
        """The drain deadline: every generation still running ends now with 503
        ``shutting_down`` (streams: an error event, then the end of the body), before
        uvicorn's own deadline (``DRAIN_GRACE_S`` later) cancels what is left."""
        why = (
            f"the neuron is shutting down: its drain deadline ({self.settings.drain_timeout_s:g}"
            "s) ended this generation; retry it"
        )
        cut = sum(gate.cut(why) for gate in self._admission.values())
        if cut:
            log.warning("drain deadline: generations cut", extra={"cut": cut})

    # -- views ------------------------------------------------------------------------------

    def models(self) -> list[ModelStatus]:
        statuses = [s for h in self.harnesses.values() for s in h.list()]
        loaded = {s.id for s in statuses}
        for model_id, spec in self._load_specs.items():
            if model_id not in loaded:
                # Where it is going, once placed: cortex counts it against that device.
                key = self.harnesses[spec.harness].loading().get(model_id, CPU)
                statuses.append(
                    ModelStatus(
                        id=model_id,
                        harness=spec.harness,
                        status="loading",
                        devices=[] if key == CPU else [int(key.split(":")[1])],
                        vram_used_mb=0,
                        context_length=None,
                    )
                )
        return statuses

    def health(self) -> Health:
        cpu_used = self.engines.cpu_used()
        models = {}
        for status in self.models():
            gate = self._admission.get(status.id)
            harness = self.harnesses.get(status.harness)
            models[status.id] = ModelLoadInfo(
                in_flight=gate.in_flight if gate else 0,
                queued=gate.queued if gate else 0,
                status=status.status,
                error=status.error,
                prefix_cache=harness.prefix_cache(status.id) if harness else None,
                batch=harness.batch_info(status.id) if harness else None,
            )
        lent, held = self.lender.lent_mb, self.lender.held_mb
        devices = [
            d.model_copy(
                update={
                    "lent_mb": lent(cuda_key(d.index)),
                    "vram_free_mb": max(d.vram_free_mb - held(cuda_key(d.index)), 0),
                }
            )
            for d in self.hardware.device_health()
        ]
        return Health(
            uptime_secs=round(time.monotonic() - self.started, 3),
            devices=devices,
            cpu=CpuHealth(
                memory_used_mb=cpu_used // MB,
                memory_free_mb=max(self.cpu_budget_bytes - cpu_used - lent(CPU) * MB, 0) // MB,
                lent_mb=lent(CPU),
            ),
            activation=self.activation.snapshot(),
            models=models,
            workers=self.engines.workers(),
            loans=self.lender.views(),
            downloads=self.downloads.views(),
            draining=self.draining,
            status="draining" if self.draining else "ok",
        )
