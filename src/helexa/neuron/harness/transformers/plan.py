"""Placement of a dense (transformers) model, as pure functions: which devices may hold it,
and which one does. The model goes whole on one device: the one with the most free
memory among those allowed (``devices.candidates``) and not poisoned (``llamacpp/plan.py``
is the GGUF side, which can also split across the GPUs one process sees)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from helexa.core.errors import ApiError, unavailable
from helexa.neuron.devices import model_too_large

MB = 1024 * 1024


def insufficient_memory(message: str) -> ApiError:
    """409: room may come (an eviction, an unload); unlike ``model_too_large``."""
    return ApiError(
        409, message, type="invalid_request_error", code="insufficient_memory", param="model_id"
    )


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
