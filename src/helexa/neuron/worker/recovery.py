"""The supervisor's decisions, as pure functions: which worker a load tries first, how long
to wait before restarting a crashed worker, which models it reloads, and what a model that
keeps crashing its worker says."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from helexa.neuron.devices import candidates

STABLE_S = 60.0  # a worker up this long before it crashed starts the back-off over


def load_order(
    devices: Sequence[int] | None,
    tensor_parallel: int | None,
    cuda_indices: Sequence[int],
    free_mb: Mapping[str, int],
) -> list[str]:
    """The workers a load spec may go to, best first: the devices it allows
    (``devices.candidates``: a model lives in one worker), GPUs by free memory."""
    keys = candidates(devices, tensor_parallel, cuda_indices)
    return sorted(keys, key=lambda k: -free_mb.get(k, 0)) if len(keys) > 1 else keys


def backoff_s(crashes: int, *, base_s: float, cap_s: float = 30.0) -> float:
    """The wait before restart number ``crashes`` (1 = the first) of a worker that keeps
    crashing: ``base_s``, doubling, at most ``cap_s``."""
    return min(base_s * 2 ** max(crashes - 1, 0), cap_s)


def consecutive(crashes: int, uptime_s: float) -> int:
    """The crash count after one more crash: a worker that ran ``STABLE_S`` counts anew."""
    return 1 if uptime_s >= STABLE_S else crashes + 1


def struck(held: Sequence[str], loading: Sequence[str]) -> list[str]:
    """Whom a worker's crash counts against: the models it was loading when it died (a load
    that crashes its worker is the likeliest cause, and its neighbours did nothing), else
    every model it held."""
    return list(loading) or list(held)


@dataclass(frozen=True)
class Strikes:
    model_id: str
    strikes: int  # crashes of its worker while it was loaded or loading


def to_reload(models: Sequence[Strikes], max_restarts: int) -> tuple[list[str], list[str]]:
    """Of the models a crashed worker held or was loading: those to reload, and those that
    crashed it too often and stay ``failed`` until someone loads them again."""
    again = [m.model_id for m in models if m.strikes <= max_restarts]
    given_up = [m.model_id for m in models if m.strikes > max_restarts]
    return again, given_up


def gave_up(reason: str, strikes: int) -> str:
    return (
        f"engine_crashed: {reason}; its worker crashed {strikes} times with this model, so "
        "it is not reloaded again: load it to retry"
    )
