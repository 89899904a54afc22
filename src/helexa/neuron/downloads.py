"""Weights downloaded in the background, with progress (``POST /models/pull``, and a
cold load of a model whose weights are not here).

huggingface_hub's own machinery does the download (``snapshot_download``: resumable, the
Hugging Face cache layout); its byte progress bar is a class we pass it, which only counts.
``/health`` lists every pull with bytes done and total, rate and time left. A load that
needs weights still downloading answers 503 with Retry-After and that progress in its
message, instead of holding the request for the whole download.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from tqdm import tqdm

from helexa.core.errors import ApiError, bad_request, unavailable
from helexa.core.wire import DownloadInfo
from helexa.neuron.model_files import REPO_ID, hub_error, hub_offline, pull_patterns

log = logging.getLogger("helexa.neuron.downloads")

RATE_WINDOW_S = 10.0  # the rate is measured over the last seconds
KEPT_FINISHED = 8  # finished pulls still shown in /health


@dataclass
class Pull:
    model_id: str
    quant: str | None
    patterns: list[str]
    harness: str
    state: str = "downloading"  # downloading | done | failed
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str | None = None
    bar: Any = None  # the byte progress bar huggingface_hub updates
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))
    task: asyncio.Task[None] | None = None

    @property
    def done_bytes(self) -> int:
        return int(self.bar.n) if self.bar is not None else 0

    @property
    def total_bytes(self) -> int | None:
        total = self.bar.total if self.bar is not None else None
        return int(total) if total else None

    def rate(self) -> float | None:
        """Bytes per second over the last ``RATE_WINDOW_S``."""
        now = time.monotonic()
        self.samples.append((now, self.done_bytes))
        recent = [(t, b) for t, b in self.samples if now - t <= RATE_WINDOW_S]
        if len(recent) < 2 or recent[-1][0] - recent[0][0] < 0.2:
            return None
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])

    def view(self) -> DownloadInfo:
        rate = self.rate() if self.state == "downloading" else None
        total, done = self.total_bytes, self.done_bytes
        eta = (total - done) / rate if total and rate else None
        return DownloadInfo(
            model_id=self.model_id,
            quant=self.quant,
            state=self.state,  # type: ignore[arg-type]
            done_bytes=done if self.state != "done" or total is None else total,
            total_bytes=total,
            rate_bytes_s=round(rate) if rate else None,
            eta_s=round(eta, 1) if eta is not None else None,
            error=self.error,
        )

    def words(self) -> str:
        """Progress as a person reads it: "downloading org/name Q4_K_M: 34 %, ~2 min"."""
        view = self.view()
        what = f"{self.model_id}{f' {self.quant}' if self.quant else ''}"
        if not view.total_bytes:
            return f"downloading {what}: starting"
        share = 100 * view.done_bytes // view.total_bytes
        left = f", ~{_duration(view.eta_s)}" if view.eta_s is not None else ""
        return f"downloading {what}: {share} %{left}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(round(seconds), 1)} s"
    return f"{round(seconds / 60)} min"


def _progress(pull: Pull) -> type[tqdm]:
    """A tqdm huggingface_hub can drive that writes nothing and hands ``pull`` its byte bar
    (the one snapshot_download sums every file's bytes into)."""

    class Progress(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = io.StringIO()
            kwargs["disable"] = False
            kwargs["mininterval"] = 3600  # nothing to draw
            super().__init__(*args, **kwargs)
            desc = str(kwargs.get("desc") or "")
            if kwargs.get("unit") == "B" and desc.startswith("Reconstructing"):
                pull.bar = self

    return Progress


FAILED_KEPT_S = 30.0  # a failed pull answers loads for this long before one is tried again


class Downloads:
    def __init__(self, cache_dirs: Mapping[str, Path], env: Mapping[str, str] = os.environ) -> None:
        self.cache_dirs = cache_dirs  # harness -> its Hugging Face cache
        self.env = env
        self.pulls: dict[tuple[str, str | None], Pull] = {}
        self._told_offline = False

    def views(self) -> list[DownloadInfo]:
        return [pull.view() for pull in self.pulls.values()]

    def present(self, model_id: str, quant: str | None, harness: str) -> bool:
        """Whether the weights a load of this would use are in the cache. Blocking."""
        try:
            snapshot_download(
                model_id,
                cache_dir=self.cache_dirs[harness],
                local_files_only=True,
                allow_patterns=pull_patterns(model_id, quant, harness),
            )
        except (LocalEntryNotFoundError, FileNotFoundError):
            return False
        return True

    def pull(self, model_id: str, quant: str | None, harness: str) -> Pull:
        """The download of these weights: the one under way, else a new one. A neuron that
        may not use the hub says so (409 ``hub_offline``), once in its log."""
        if not REPO_ID.match(model_id):
            raise bad_request(
                f"{model_id!r} is not a Hugging Face repo id (org/name): nothing to download",
                param="model_id",
            )
        key = (model_id, quant)
        pull = self.pulls.get(key)
        if pull is not None and pull.state == "downloading":
            return pull
        failed_lately = (
            pull is not None
            and pull.finished is not None
            and pull.state == "failed"
            and time.monotonic() - pull.finished < FAILED_KEPT_S
        )
        if failed_lately:
            assert pull is not None
            raise unavailable(
                f"downloading {model_id} failed: {pull.error}",
                code="download_failed",
                retry_after=int(FAILED_KEPT_S),
            )
        if hub_offline(self.env):
            if not self._told_offline:
                self._told_offline = True
                log.warning("no hub access: downloads refused", extra={"why": "HF_HUB_OFFLINE"})
            raise ApiError(
                409,
                f"this neuron does not use the Hugging Face hub (HF_HUB_OFFLINE): it cannot "
                f"download {model_id}; put its files in its cache or under model_dirs",
                code="hub_offline",
                param="model_id",
            )
        pull = Pull(model_id, quant, pull_patterns(model_id, quant, harness), harness)
        self.pulls[key] = pull
        pull.task = asyncio.ensure_future(self._run(pull))
        self._forget_finished()
        log.info("download started", extra={"model_id": model_id, "quant": quant})
        return pull

    async def _run(self, pull: Pull) -> None:
        try:
            await asyncio.to_thread(
                snapshot_download,
                pull.model_id,
                cache_dir=self.cache_dirs[pull.harness],
                allow_patterns=pull.patterns,
                tqdm_class=_progress(pull),
            )
        except Exception as exc:
            pull.finished = time.monotonic()
            pull.state = "failed"
            pull.error = hub_error(pull.model_id, pull.quant, exc).message
            log.error("download failed", extra={"model_id": pull.model_id, "error": pull.error})
            return
        pull.finished = time.monotonic()
        pull.state = "done"
        log.info(
            "download done",
            extra={
                "model_id": pull.model_id,
                "quant": pull.quant,
                "mb": pull.done_bytes // (1024 * 1024),
                "secs": round(time.monotonic() - pull.started, 1),
            },
        )

    def _forget_finished(self) -> None:
        finished = [k for k, p in self.pulls.items() if p.state != "downloading"]
        for key in finished[:-KEPT_FINISHED] if len(finished) > KEPT_FINISHED else []:
            del self.pulls[key]

    def waiting(self, pull: Pull) -> ApiError:
        """The 503 a load gets while its weights download: the progress, and when to ask."""
        eta = pull.view().eta_s
        retry = int(min(max(eta or 10, 2), 30))
        return unavailable(pull.words(), code="downloading", retry_after=retry)

    async def stop(self) -> None:
        for pull in self.pulls.values():
            if pull.task is not None:
                pull.task.cancel()  # the thread finishes its file; the cache keeps it
