"""The weights this neuron holds: what ``cortex models ls`` lists and ``cortex models rm``
deletes. The Hugging Face caches of its harnesses (huggingface_hub's own scan and delete),
and the folders and GGUF files under ``model_dirs`` (listed, never deleted: they are the
operator's)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from huggingface_hub import CachedRepoInfo, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

from helexa.core.errors import ApiError, not_found
from helexa.core.wire import StoredModel

log = logging.getLogger("helexa.neuron.stored")


def _repos(cache_dirs: Iterable[Path]) -> Iterator[CachedRepoInfo]:
    """The model repos of each Hugging Face cache (each once, however many harnesses)."""
    for cache in dict.fromkeys(cache_dirs):
        try:
            scan = scan_cache_dir(cache)
        except CacheNotFound:
            continue
        yield from (repo for repo in scan.repos if repo.repo_type == "model")


def _cached(cache_dirs: Iterable[Path]) -> list[StoredModel]:
    found: dict[str, StoredModel] = {}
    for repo in _repos(cache_dirs):
        files = sorted({f.file_name for rev in repo.revisions for f in rev.files})
        found[repo.repo_id] = StoredModel(
            model_id=repo.repo_id, where="cache", bytes=repo.size_on_disk, files=files[:50]
        )
    return list(found.values())


def _in_model_dirs(model_dirs: Iterable[Path]) -> list[StoredModel]:
    found = []
    for root in model_dirs:
        root = root.expanduser()
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.is_dir():
                files = sorted(p.name for p in entry.iterdir())
                size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
            elif entry.suffix.lower() == ".gguf":
                files, size = [entry.name], entry.stat().st_size
            else:
                continue
            found.append(
                StoredModel(model_id=entry.name, where="model_dirs", bytes=size, files=files[:50])
            )
    return found


def stored(cache_dirs: Iterable[Path], model_dirs: Iterable[Path]) -> list[StoredModel]:
    """Every model whose weights are here. Blocking (reads the disks)."""
    return _cached(cache_dirs) + _in_model_dirs(model_dirs)


def delete(model_id: str, cache_dirs: Iterable[Path]) -> int:
    """Delete a model's weights from the Hugging Face caches; the bytes freed. Blocking."""
    freed = 0
    for repo in _repos(cache_dirs):
        if repo.repo_id == model_id:
            # The repo's whole folder (blobs, snapshots, refs): revisions are named by commit
            # hash, which need not be unique across repos.
            freed += repo.size_on_disk
            shutil.rmtree(repo.repo_path)
    if not freed:
        raise not_found(
            f"{model_id!r} is not in this neuron's Hugging Face cache (weights under "
            "model_dirs are the operator's and never deleted)",
            code="model_weights_not_found",
            param="model_id",
        )
    log.info("weights deleted", extra={"model_id": model_id, "mb": freed // (1024 * 1024)})
    return freed


def in_use(model_id: str) -> ApiError:
    return ApiError(
        409,
        f"{model_id!r} is loaded: unload it before deleting its weights",
        code="model_loaded",
        param="model_id",
    )
