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
        sizes = [size for name, size in files if name.endswith(".safetensors")]
    if not sizes or any(size is None for size in sizes):
        return None
    return sum(s for s in sizes if s is not None)


def hub_listing(model_id: str) -> Listing:
    """The repo's files and sizes, from the hub (blocking; raises when unreachable)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(model_id, files_metadata=True, timeout=10)
    return [(s.rfilename, s.size) for s in info.siblings or []]


class WeightSizes:
    def __init__(self, fetch: Callable[[str], Listing] = hub_listing) -> None:
        self._fetch = fetch
        self._known: dict[tuple[str, str | None], int | None] = {}

    async def mb(self, profile: ModelProfile) -> int | None:
        key = (profile.id, profile.quant)
        if key not in self._known:
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
