"""Placement of a dense (transformers) model, as pure functions: which devices may hold it,
and which one does. The model goes whole on one device: the one with the most free
memory among those allowed and not poisoned (``llamacpp/plan.py`` is the GGUF side, which
also splits across GPUs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from helexa.core.errors import ApiError, bad_request, unavailable
from helexa.neuron.devices import CPU, cuda_key, model_too_large

MB = 1024 * 1024


def insufficient_memory(message: str) -> ApiError:
    """409: room may come (an eviction, an unload); unlike ``model_too_large``."""
    return ApiError(
        409, message, type="invalid_request_error", code="insufficient_memory", param="model_id"
    )


def candidates(
    devices: Sequence[int] | None, tensor_parallel: int | None, cuda_indices: Sequence[int]
) -> list[str]:
    """Device keys a load spec allows: ``devices: []`` the CPU, ``[i]`` that GPU, unset
    every GPU (the CPU without one). More than one device is refused: the model is whole."""
    if (tensor_parallel or 1) > 1 or (devices and len(devices) > 1):
        raise bad_request(
            "the transformers harness places a model on exactly one device; "
            "tensor_parallel and multi-device placement are not supported (the llamacpp "
            "harness splits GGUF models across GPUs)",
            param="devices",
            code="unsupported_placement",
        )
    if devices == []:
        return [CPU]
    if devices:
        index = devices[0]
        if index not in cuda_indices:
            raise bad_request(
                f"no CUDA device {index} on this host (have {list(cuda_indices)}); "
                "devices: [] is the CPU",
                param="devices",
                code="no_such_device",
            )
        return [cuda_key(index)]
    return [cuda_key(i) for i in cuda_indices] or [CPU]


def healthy(keys: Sequence[str], poisoned: Sequence[str]) -> list[str]:
    """The candidates whose workers are not poisoned; a 503 when none is left."""
    left = [k for k in keys if k not in poisoned]
    if not left:
        raise unavailable(
            f"every candidate device is poisoned ({', '.join(keys)}); unload and reload its "
            "models, or restart the neuron",
            code="device_poisoned",
            retry_after=30,
        )
    return left


def best_device(keys: Sequence[str], room: Mapping[str, int]) -> str:
    """The device with the most free bytes (the first of equals, in the order given)."""
    return max(keys, key=lambda k: room[k])


def refusal(need: int, best: str, room: Mapping[str, int], capacity: Mapping[str, int]) -> ApiError:
    """Why ``need`` bytes fit nowhere: 400 when no device could ever hold them, else 409
    (the best device is full now)."""
    largest = max(capacity, key=lambda k: capacity[k])
    if need > capacity[largest]:
        return model_too_large(need, capacity[largest], largest)
    return insufficient_memory(
        f"not enough memory: the model needs ~{need // MB} MB, the best device "
        f"({best}) has {max(room[best], 0) // MB} MB free"
    )
