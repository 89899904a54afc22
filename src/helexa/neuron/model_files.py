"""Where a model's files are: the Hugging Face cache (download only what is missing) or a
directory under ``model_dirs``. Paths outside those directories are refused."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from helexa.core.errors import ApiError, bad_request, not_found, unavailable

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
    model_id: str = ""  # what the files are called in error messages (never ``root``)

    def hide(self, text: str) -> str:
        """``text`` with this model's folder replaced by its name (see ``hide_paths``)."""
        return hide_paths(text, self.root, repr(self.model_id) if self.model_id else "<model>")


def pull_patterns(model_id: str, quant: str | None, harness: str) -> list[str]:
    """The files of a hub repo a load of it uses, as ``allow_patterns``: one quant of a GGUF
    repo (never all of them), or a dense model's weights, config and tokenizer."""
    if quant:
        return gguf_patterns(quant)
    if harness == "llamacpp":
        raise bad_request(
            f'{model_id} is a GGUF repo: name the quant to download (e.g. "quant": '
            '"Q4_K_M"); a repo holds many',
            param="quant",
        )
    return DENSE_PATTERNS


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


def resolve_local_gguf(model_id: str, model_dirs: list[Path]) -> tuple[Path, str] | None:
    """``(folder, file name)`` when ``model_id`` names a GGUF file under one of
    ``model_dirs``: ``x.gguf``, or ``x`` for ``x.gguf`` where no folder ``x`` exists (a file
    laid straight into a model_dirs entry, named with or without its suffix),
    ``folder/x.gguf``, or its absolute path. Never a file outside those directories."""
    raw = model_id.replace("\\", "/")
    if not raw.strip("/") or "\x00" in raw:
        return None
    if raw.lower().endswith(".gguf"):
        name = raw
    else:
        try:
            if resolve_local_dir(model_id, model_dirs) is not None:
                return None  # a folder of that name comes first
        except (ApiError, OSError, ValueError):
            return None
        name = raw + ".gguf"
    for base in model_dirs:
        try:  # a name too long, a folder the neuron may not enter: not this model
            base_real = base.expanduser().resolve()
            path = Path(name)
            candidate = (path if path.is_absolute() else base_real / name).resolve()
            if candidate.is_relative_to(base_real) and candidate.is_file():
                return candidate.parent, candidate.name
        except (OSError, ValueError):
            continue
    return None


def gguf_only_folder(model_id: str, model_dirs: list[Path]) -> bool:
    """True when ``model_id`` is a local GGUF: a file, or a folder holding GGUF files and no
    config.json (which transformers could not load)."""
    if resolve_local_gguf(model_id, model_dirs) is not None:
        return True
    try:
        folder = resolve_local_dir(model_id, model_dirs)
        if folder is None or (folder / "config.json").is_file():
            return False
        return any(p.suffix.lower() == ".gguf" for p in folder.rglob("*") if p.is_file())
    except (ApiError, OSError, ValueError):
        return False


def harness_for_files(model_id: str, harness: str, model_dirs: list[Path]) -> str:
    """The harness that can run ``model_id``: a local GGUF (a file, or a folder of GGUF files
    without config.json) goes to llamacpp where ``harness`` says transformers, which could
    not load it (the default a spec gets from its name alone); anything else as given."""
    if harness == "transformers" and gguf_only_folder(model_id, model_dirs):
        return "llamacpp"
    return harness


def canonical_model_id(model_id: str, model_dirs: list[Path]) -> str:
    """One spelling per local model: ``./x``, ``x/.``, ``x//`` and ``/abs/models/x`` all name
    the folder ``x`` under a ``model_dirs`` entry, and all become ``x`` (its path relative to
    the first entry that resolves back to it; the absolute path where none does). A ``.gguf``
    file under model_dirs becomes ``<canonical folder>/<file>``. Anything that is not a local
    folder (a Hugging Face repo id, an unknown name) is returned unchanged; so is a path outside
    model_dirs (the load that follows refuses it with the 403)."""
    if not model_dirs:
        return model_id
    try:
        direct = resolve_local_gguf(model_id, model_dirs)
        if direct is not None:
            folder, name = direct
            if any(folder == base.expanduser().resolve() for base in model_dirs):
                return name  # a file laid straight into a model_dirs entry: its file name
            return f"{_spelling(folder, model_dirs)}/{name}"
        if model_id.lower().endswith(".gguf"):
            parent, _, name = model_id.replace("\\", "/").rpartition("/")
            folder = resolve_local_dir(parent, model_dirs) if parent else None
            if folder is None or not name:
                return model_id
            return f"{_spelling(folder, model_dirs)}/{name}"
        local = resolve_local_dir(model_id, model_dirs)
    except (ApiError, OSError, ValueError):
        return model_id
    return model_id if local is None else _spelling(local, model_dirs)


def _spelling(folder: Path, model_dirs: list[Path]) -> str:
    for base in model_dirs:
        base_real = base.expanduser().resolve()
        if folder.is_relative_to(base_real):
            relative = folder.relative_to(base_real).as_posix()
            try:
                if resolve_local_dir(relative, model_dirs) == folder:
                    return relative
            except ApiError:
                pass
    return str(folder)


def hide_paths(text: str, root: Path, label: str) -> str:
    """``text`` (a library's error message) with the server-side folder ``root`` replaced by
    ``label``: error bodies name models, never the neuron's paths."""
    for spelling in {str(root), str(root.resolve())}:
        text = text.replace(spelling, label)
    return text


def missing_local(model_id: str, why: str, model_dirs: list[Path]) -> ApiError:
    """404 for a local model that is not there: never hub advice, it names no repo."""
    return not_found(
        f"{model_id!r} is not on this neuron: {why}. Put the GGUF file or the model's folder "
        "under one of the neuron's model_dirs"
        + (" (it has none configured)" if not model_dirs else "")
        + " and name it by its path there (a GGUF file by its file name, with or without "
        "'.gguf')",
        code="model_weights_not_found",
        param="model_id",
    )


def missing_weights(model_id: str, quant: str | None, why: str) -> ApiError:
    """404 ``model_weights_not_found``: what is missing, why, and what to do on the host."""
    what = f"{model_id!r}" + (f" (quant {quant})" if quant else "")
    include = f" --include '*{quant}*.gguf'" if quant else ""
    return not_found(
        f"the weights of {what} are not on this neuron: {why}. Download them on the neuron's "
        f"host (`hf download {model_id}{include}`, or `huggingface-cli download`, as the user "
        "the neuron runs as, so they land in its Hugging Face cache), or put the model's "
        "folder under one of the neuron's model_dirs",
        code="model_weights_not_found",
        param="model_id",
    )


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
            raise _not_a_model(model_id, quant, model_dirs)
        patterns = (
            ["*.json", "*.jinja", "*.txt", "*.model", f"*{quant}*.gguf"]
            if quant
            else (DENSE_PATTERNS)
        )
        root = _from_hub(model_id, quant, patterns, cache_dir, env)
    gguf = select_gguf(_list_files(root), quant) if quant else None
    if gguf is None and not (root / "config.json").is_file():
        raise not_found(
            f"{model_id}: its folder has no config.json (a dense model needs the Hugging Face "
            "layout: config.json, tokenizer files, *.safetensors)",
            code="model_weights_not_found",
            param="model_id",
        )
    return ModelFiles(root=root, gguf_file=gguf, model_id=model_id)


def _not_a_model(model_id: str, quant: str | None, model_dirs: list[Path]) -> ApiError:
    """A name that is neither a folder or GGUF file under model_dirs nor a Hugging Face repo
    id: there is nothing to download, so the advice is about model_dirs only."""
    if not model_dirs:
        return bad_request(
            f"model_id {model_id!r} is not a Hugging Face repo id (org/name), and this neuron "
            "has no model_dirs for local models",
            param="model_id",
        )
    return missing_local(
        model_id,
        "there is no such folder or GGUF file under model_dirs, and it is not a Hugging Face "
        "repo id (org/name)",
        model_dirs,
    )


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
    direct = resolve_local_gguf(model_id, model_dirs)
    if direct is not None:
        return ModelFiles(root=direct[0], gguf_file=direct[1], model_id=model_id)
    if model_id.lower().endswith(".gguf"):
        raise missing_local(model_id, "there is no such GGUF file under model_dirs", model_dirs)
    local = resolve_local_dir(model_id, model_dirs)
    if local is not None:
        root = local
    elif not REPO_ID.match(model_id):
        raise _not_a_model(model_id, quant, model_dirs)
    elif quant:
        root = _from_hub(model_id, quant, gguf_patterns(quant), cache_dir, env)
    else:  # never download every quantization of a repo: only a cached one is picked
        try:
            root = _from_hub(
                model_id, None, ["*.json", "*.jinja", "*.gguf"], cache_dir, {"HF_HUB_OFFLINE": "1"}
            )
        except ApiError as exc:
            if exc.code != "model_weights_not_found":
                raise
            raise not_found(
                f"no GGUF file of {model_id!r} is on this neuron, and without a quant none is "
                "downloaded (a GGUF repo holds many): name the quant to fetch (e.g. "
                '"quant": "Q4_K_M"), or download one on the neuron\'s host '
                f"(`hf download {model_id} --include '*Q4_K_M*.gguf'`)",
                code="model_weights_not_found",
                param="quant",
            ) from None
    if quant:
        return ModelFiles(
            root=root, gguf_file=select_gguf(_list_files(root), quant), model_id=model_id
        )
    ggufs = sorted(f for f in _list_files(root) if f.lower().endswith(".gguf"))
    if not ggufs:
        raise not_found(
            f"{model_id}: its folder holds no GGUF file; name one (folder/file.gguf) or a quant",
            code="model_weights_not_found",
            param="model_id",
        )
    return ModelFiles(
        root=root,
        gguf_file=_one_gguf(ggufs, "several GGUF files; name one with quant"),
        model_id=model_id,
    )


def _from_hub(
    model_id: str,
    quant: str | None,
    patterns: list[str],
    cache_dir: Path,
    env: Mapping[str, str],
) -> Path:
    """The snapshot folder of ``model_id`` in the weight cache, downloading what is missing
    when the hub may be used. Weights that cannot be had are a 404 (nothing will change until
    someone acts on the host); a hub that answers but fails is a 503 (try again later)."""
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
            raise missing_weights(
                model_id,
                quant,
                "they are not in its Hugging Face cache or under model_dirs, and the hub is "
                "offline (HF_HUB_OFFLINE)",
            ) from None
    log.info("downloading model", extra={"model_id": model_id, "cache": str(cache_dir)})
    try:
        return Path(snapshot_download(model_id, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as exc:
        raise hub_error(model_id, quant, exc) from exc


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def hub_error(model_id: str, quant: str | None, exc: BaseException) -> ApiError:
    """What a failed download means for the client, without the library's text (it names
    the server's cache paths): 404 when the weights cannot be had as things stand (no such
    repo, gated or private, hub unreachable), 503 when the hub answered but failed (5xx, 429,
    a download cut short: worth another try), 507 when the disk is full."""
    log.warning(
        "download failed",
        extra={"model_id": model_id, "error": f"{type(exc).__name__}: {exc}"},
    )
    if isinstance(exc, RepositoryNotFoundError):  # GatedRepoError is one too
        gated = isinstance(exc, GatedRepoError)
        return missing_weights(
            model_id,
            quant,
            "the repo is gated: accept its terms on huggingface.co and give the neuron a token "
            "(HF_TOKEN)"
            if gated
            else "the Hugging Face hub has no such repo (or it is private: give the neuron a "
            "token, HF_TOKEN)",
        )
    unreachable = isinstance(exc, LocalEntryNotFoundError)  # nothing cached, hub not usable
    cause = exc.__cause__ if unreachable else exc
    status = _http_status(cause) if cause is not None else None
    if status in (401, 403):
        return missing_weights(
            model_id,
            quant,
            "the Hugging Face hub refused access (a private or gated repo: give the neuron a "
            "token, HF_TOKEN)",
        )
    if status == 404 or (isinstance(exc, EntryNotFoundError) and not unreachable):
        return missing_weights(model_id, quant, "the Hugging Face hub has no such repo or files")
    if unreachable and status is None:  # no connection (or offline mode)
        return missing_weights(
            model_id,
            quant,
            "they are not in its Hugging Face cache or model_dirs, and the Hugging Face hub "
            "cannot be reached from the neuron's host",
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ApiError(
            507,
            f"downloading {model_id!r} failed: no space left in the neuron's weight cache",
            type="server_error",
            code="insufficient_storage",
            param="model_id",
        )
    detail = f"HTTP {status}" if status is not None else type(cause or exc).__name__
    return unavailable(
        f"downloading the weights of {model_id!r} from the Hugging Face hub failed ({detail}); "
        "the hub was reachable, so this may pass: try again later",
        code="weights_download_failed",
        retry_after=30,
    )


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
