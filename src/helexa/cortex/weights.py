"""Weight-file sizes for profiles without ``vram_mb`` (need = 1.2 x the weights, §2.4).

cortex never sees the files, so it asks the Hugging Face hub for the repo's listing once
per model (off the event loop) and remembers the answer. Where the hub cannot be asked
(offline, private network), the size is unknown: placement then relies on the neuron's
own memory check, and that is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable

from helexa.core.catalogue import ModelProfile

log = logging.getLogger("helexa.cortex.weights")

MB = 1024 * 1024
Listing = Iterable[tuple[str, int | None]]


def weights_bytes(files: Listing, quant: str | None) -> int | None:
    """Bytes of the weights a load would use: every safetensors shard, or the GGUF file
    carrying the ``quant`` tag. None when the listing has no such files."""
    files = list(files)
    if quant:
        tag = re.compile(rf"(^|[^a-z0-9]){re.escape(quant.lower())}([^a-z0-9]|$)")
        sizes = [
            size
            for name, size in files
            if name.lower().endswith(".gguf") and tag.search(name.rsplit("/", 1)[-1].lower())
        ]
    else:
        # Top-level shards only; "consolidated" files duplicate the shards in some repos.
        dense = [(n, s) for n, s in files if n.endswith(".safetensors") and "/" not in n]
        shards = [(n, s) for n, s in dense if not n.startswith("consolidated")]
        sizes = [size for _name, size in (shards or dense)]
    if not sizes or any(size is None for size in sizes):
        return None
    return sum(s for s in sizes if s is not None)


def hub_listing(model_id: str) -> Listing:
    """The repo's files and sizes, from the hub (blocking; raises when unreachable)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(model_id, files_metadata=True, timeout=5)
    return [(s.rfilename, s.size) for s in info.siblings or []]


class WeightSizes:
    RETRY_AFTER_S = 300.0  # an unknown size is asked again after this long

    def __init__(self, fetch: Callable[[str], Listing] = hub_listing) -> None:
        self._fetch = fetch
        self._known: dict[tuple[str, str | None], int | None] = {}
        self._asked_at: dict[tuple[str, str | None], float] = {}

    async def mb(self, profile: ModelProfile) -> int | None:
        key = (profile.id, profile.quant)
        stale = self._known.get(key, 0) is None and (
            time.monotonic() - self._asked_at.get(key, 0.0) > self.RETRY_AFTER_S
        )
        if key not in self._known or stale:
            self._asked_at[key] = time.monotonic()
            try:
                listing = await asyncio.to_thread(self._fetch, profile.id)
                size = weights_bytes(listing, profile.quant)
            except Exception as exc:  # offline, unknown repo, auth: all mean "unknown"
                log.warning(
                    "weight size unknown: placing without a memory estimate",
                    extra={"model": profile.id, "error": str(exc)[:200]},
                )
                size = None
            self._known[key] = size
        size = self._known[key]
        return None if size is None else -(-size // MB)
