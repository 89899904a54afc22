"""Blocking helpers that turn located model files into a tokenizer, weights and metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from helexa.core.errors import ApiError, bad_request, not_found
from helexa.neuron.gguf_header import read_header
from helexa.neuron.model_files import ModelFiles, as_ids
from helexa.neuron.weights_check import (
    GGUF_READ_ERRORS,
    check_gguf,
    check_safetensors,
    unreadable_gguf,
)

SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def unsupported(message: str) -> ApiError:
    return bad_request(message, param="model_id", code="unsupported_architecture")


def check_architecture(config: dict[str, Any]) -> None:
    """Refuse early, with the reason, what transformers cannot run as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not model_type:
        raise unsupported("config.json has no model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise unsupported(
            f"architecture {model_type!r} is not supported as a causal LM by transformers "
            f"(architectures: {config.get('architectures')})"
        )


def pick_dtype(setting: str, *, cuda: bool, bf16_supported: bool) -> torch.dtype:
    if setting != "auto":
        try:
            return DTYPES[setting]
        except KeyError:
            raise bad_request(f"unknown dtype {setting!r}; use one of {sorted(DTYPES)}") from None
    if not cuda:
        return torch.float32
    return torch.bfloat16 if bf16_supported else torch.float16


def _safetensors_elements(path: Path) -> int:
    header = check_safetensors(path)
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in meta["shape"]:
            count *= dim
        total += count
    return total


def _gguf_elements(path: Path) -> int:
    check_gguf(path)
    try:
        return read_header(path).elements
    except GGUF_READ_ERRORS as exc:
        raise unreadable_gguf(path, exc) from None


def estimate_bytes(files: ModelFiles, dtype: torch.dtype) -> int:
    """Memory the weights take once loaded in ``dtype`` (parameter count times element size)."""
    element = torch.empty((), dtype=dtype).element_size()
    if files.gguf_file is not None:
        return _gguf_elements(files.root / files.gguf_file) * element
    shards = sorted(files.root.glob("*.safetensors"))
    if not shards:
        raise not_found(
            f"{files.model_id or 'the model'}: its folder has no *.safetensors weights",
            code="model_weights_not_found",
            param="model_id",
        )
    return sum(_safetensors_elements(p) for p in shards) * element


def load_tokenizer(files: ModelFiles) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if files.gguf_file:
        kwargs["gguf_file"] = files.gguf_file
    try:
        return AutoTokenizer.from_pretrained(str(files.root), **kwargs)
    except Exception as exc:
        raise bad_request(
            f"cannot load the tokenizer: {files.hide(str(exc))}",
            param="model_id",
            code="tokenizer_unavailable",
        ) from exc


def load_weights(files: ModelFiles, dtype: torch.dtype, device: torch.device) -> Any:
    """Blocking; runs off the device worker. On CUDA the weights are read straight onto the
    device (``device_map``), not staged in host memory first."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.type == "cuda":
        kwargs["device_map"] = str(device)
    if files.gguf_file:
        kwargs["gguf_file"] = files.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(str(files.root), **kwargs)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise unsupported(f"transformers cannot load this model: {files.hide(str(exc))}") from exc
    except OSError as exc:
        raise not_found(
            f"cannot read the weights: {files.hide(str(exc))}",
            code="model_weights_not_found",
            param="model_id",
        ) from exc
    try:
        model = model.to(device)
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError
        if "out of memory" not in str(exc).lower():
            raise
        del model
        raise ApiError(
            409,
            f"not enough memory on {device} to load the weights: {exc}",
            code="insufficient_memory",
            param="model_id",
        ) from exc
    model.eval()
    return model


def model_bytes(model: Any) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


def eos_ids(
    generation_config: dict[str, Any], config: dict[str, Any], tokenizer: Any
) -> frozenset[int]:
    """Every id that ends generation: generation_config, config and the tokenizer's."""
    ids = as_ids(generation_config.get("eos_token_id"))
    ids |= as_ids(config.get("eos_token_id"))
    ids |= as_ids(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)


def context_length(config: dict[str, Any], model: Any) -> int:
    text_config = config.get("text_config") or config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(text_config.get(key), int):
            return int(text_config[key])
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if value else 2048


def output_tags(tokenizer: Any) -> frozenset[str]:
    """Which reasoning / tool-call tags the model can write (single tokens in its vocab)."""
    vocab = tokenizer.get_vocab()
    tags = ("<think>", "</think>", "<tool_call>", "</tool_call>")
    return frozenset(t for t in tags if t in vocab)
