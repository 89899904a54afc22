"""Where a model's files are: the Hugging Face cache (download only what is missing) or a
directory under ``model_dirs``. Paths outside those directories are refused."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from helexa.core.errors import ApiError, bad_request, not_found

log = logging.getLogger("helexa.neuron.model_files")

# Files worth fetching for a dense checkpoint (never *.gguf, *.bin, *.pt, ...).
DENSE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def gguf_patterns(quant: str) -> list[str]:
    """Files worth fetching to run a GGUF repo's ``quant`` file (never its other quants)."""
    return ["*.json", "*.jinja", f"*{quant}*.gguf"]


@dataclass(frozen=True)
class ModelFiles:
    root: Path  # directory holding config/tokenizer (and weights unless GGUF)
    gguf_file: str | None = None  # file name inside root when loading a GGUF


def hf_cache_dir(setting: Path | None, env: Mapping[str, str] = os.environ) -> Path:
    """The weight cache, first hit wins: harness setting, HF_HUB_CACHE, HF_HOME/hub, default."""
    if setting is not None:
        return Path(setting).expanduser()
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def hub_offline(env: Mapping[str, str] = os.environ) -> bool:
    return env.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def looks_like_path(model_id: str) -> bool:
    parts = model_id.replace("\\", "/").split("/")
    return model_id.startswith(("/", "~", ".")) or ".." in parts or "\x00" in model_id


def resolve_local_dir(model_id: str, model_dirs: list[Path]) -> Path | None:
    """The directory for ``model_id`` under one of ``model_dirs``, if it names one.

    Raises 403 when ``model_id`` is a path that escapes every configured directory.
    """
    for base in model_dirs:
        base_real = base.expanduser().resolve()
        candidate = (base_real / model_id.lstrip("/")).resolve()
        if Path(model_id).is_absolute():
            candidate = Path(model_id).resolve()
        if candidate.is_relative_to(base_real) and candidate != base_real and candidate.is_dir():
            return candidate
    if looks_like_path(model_id):
        raise ApiError(
            403,
            f"model_id {model_id!r} is a path outside the configured model_dirs",
            type="permission_error",
            code="path_not_allowed",
            param="model_id",
        )
    return None


def select_gguf(file_names: list[str], quant: str) -> str:
    """The one GGUF file whose name carries the ``quant`` tag (case-insensitive)."""
    tag = quant.lower()
    ggufs = sorted(f for f in file_names if f.lower().endswith(".gguf"))
    tagged = [
        f
        for f in ggufs
        if re.search(rf"(^|[^a-z0-9]){re.escape(tag)}([^a-z0-9]|$)", Path(f).name.lower())
    ]
    if not tagged:
        available = ", ".join(Path(f).name for f in ggufs) or "none"
        raise not_found(
            f"no GGUF file tagged {quant!r} (available: {available})",
            code="model_weights_not_found",
            param="quant",
        )
    return _one_gguf(tagged, f"quant {quant!r} matches several files")


def _one_gguf(names: list[str], problem: str) -> str:
    """The file to load among ``names``: the only one, or the first part of one split set
    (llama.cpp reads the other parts itself)."""
    if len(names) == 1:
        return names[0]
    stems = {SPLIT_PART.sub("", n) for n in names}
    if len(stems) == 1 and all(SPLIT_PART.search(n) for n in names):
        return sorted(names)[0]
    raise bad_request(f"{problem}: {', '.join(names)}", param="quant")


def _list_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]


def locate(
    model_id: str,
    quant: str | None,
    *,
    cache_dir: Path,
    model_dirs: list[Path],
    env: Mapping[str, str] = os.environ,
) -> ModelFiles:
    """Find (and if needed and allowed, download) the files for one model. Blocking."""
    local = resolve_local_dir(model_id, model_dirs)
    if local is not None:
        root = local
    else:
        if not REPO_ID.match(model_id):
            raise bad_request(
                f"model_id {model_id!r} is neither a Hugging Face repo id (org/name) nor a "
                "directory under model_dirs",
                param="model_id",
            )
        patterns = (
            ["*.json", "*.jinja", "*.txt", "*.model", f"*{quant}*.gguf"]
            if quant
            else (DENSE_PATTERNS)
        )
        root = _from_hub(model_id, patterns, cache_dir, env)
    gguf = select_gguf(_list_files(root), quant) if quant else None
    if gguf is None and not (root / "config.json").is_file():
        raise not_found(
            f"{model_id}: no config.json in {root}",
            code="model_weights_not_found",
            param="model_id",
        )
    return ModelFiles(root=root, gguf_file=gguf)


def locate_gguf(
    model_id: str,
    quant: str | None,
    *,
    cache_dir: Path,
    model_dirs: list[Path],
    env: Mapping[str, str] = os.environ,
) -> ModelFiles:
    """The GGUF file to run for ``model_id``: a ``.gguf`` path under ``model_dirs``, or the
    file tagged ``quant`` in a directory or hub repo (without ``quant``, its only GGUF)."""
    if model_id.lower().endswith(".gguf"):
        parent, _, name = model_id.replace("\\", "/").rpartition("/")
        folder = resolve_local_dir(parent, model_dirs) if parent else None
        if folder is None or not (folder / name).is_file():
            raise not_found(
                f"{model_id}: no such GGUF file under model_dirs",
                code="model_weights_not_found",
                param="model_id",
            )
        return ModelFiles(root=folder, gguf_file=name)
    local = resolve_local_dir(model_id, model_dirs)
    if local is not None:
        root = local
    elif not REPO_ID.match(model_id):
        raise bad_request(
            f"model_id {model_id!r} is neither a Hugging Face repo id (org/name) nor a "
            "directory under model_dirs",
            param="model_id",
        )
    elif quant:
        root = _from_hub(model_id, gguf_patterns(quant), cache_dir, env)
    else:  # never download every quantization of a repo: only a cached one is picked
        root = _from_hub(
            model_id, ["*.json", "*.jinja", "*.gguf"], cache_dir, {"HF_HUB_OFFLINE": "1"}
        )
    if quant:
        return ModelFiles(root=root, gguf_file=select_gguf(_list_files(root), quant))
    ggufs = sorted(f for f in _list_files(root) if f.lower().endswith(".gguf"))
    if not ggufs:
        raise not_found(
            f"{model_id}: no GGUF file in {root}", code="model_weights_not_found", param="model_id"
        )
    return ModelFiles(
        root=root, gguf_file=_one_gguf(ggufs, "several GGUF files; name one with quant")
    )


def _from_hub(model_id: str, patterns: list[str], cache_dir: Path, env: Mapping[str, str]) -> Path:
    try:
        return Path(
            snapshot_download(
                model_id, cache_dir=cache_dir, local_files_only=True, allow_patterns=patterns
            )
        )
    except HFValidationError as exc:
        raise bad_request(f"invalid model_id {model_id!r}: {exc}", param="model_id") from exc
    except LocalEntryNotFoundError:
        if hub_offline(env):
            raise not_found(
                f"{model_id} is not in the weight cache {cache_dir} and the hub is offline "
                "(HF_HUB_OFFLINE)",
                code="model_weights_not_found",
                param="model_id",
            ) from None
    log.info("downloading model", extra={"model_id": model_id, "cache": str(cache_dir)})
    try:
        return Path(snapshot_download(model_id, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all mean "no weights here"
        raise not_found(
            f"{model_id}: weights not cached in {cache_dir} and download failed: {exc}",
            code="model_weights_not_found",
            param="model_id",
        ) from exc


# -- metadata every harness reads the same way ------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise bad_request(f"{path.name} is unreadable: {exc}", param="model_id") from exc


def as_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def generation_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """Sampling defaults the model ships with; ``do_sample: false`` means greedy."""
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    defaults = {k: generation_config[k] for k in keys if generation_config.get(k) is not None}
    if generation_config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults
