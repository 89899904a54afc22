"""Sizing and placement of a GGUF model, as pure functions: KV bytes, the context it gets,
and which device(s) hold it — one GPU, a split across several mismatched GPUs in proportion
to their free memory (llama.cpp's ``tensor_split``), the CPU, or a pool of this host's
device and other hosts' (ggml RPC) in proportion to the memory each gives."""

from __future__ import annotations

from dataclasses import dataclass

from helexa.core.errors import ApiError, bad_request
from helexa.neuron.devices import CPU, cuda_key

MB = 1024 * 1024
KV_ELEMENT_BYTES = 2  # f16 K and V cells


def kv_bytes(tokens: int, *, n_layer: int, n_head_kv: int, head_k: int, head_v: int) -> int:
    return tokens * n_layer * n_head_kv * (head_k + head_v) * KV_ELEMENT_BYTES


def context_tokens(trained: int, configured: int | None, default_cap: int) -> int:
    """KV cells of the model's context: the setting, else the trained context up to a cap
    (a 128 k context's KV would dwarf a small model's weights); never past training."""
    if configured is not None:
        return min(configured, trained) if trained > 0 else configured
    return min(trained, default_cap) if trained > 0 else default_cap


@dataclass(frozen=True)
class Placement:
    keys: tuple[str, ...]  # device keys holding the model (the first one's worker drives it)
    tensor_split: tuple[float, ...] = ()  # fractions by CUDA index when split over several GPUs
    share: tuple[int, ...] = ()  # bytes reserved on each key

    @property
    def on_cpu(self) -> bool:
        return self.keys == (CPU,)

    @property
    def cuda_indices(self) -> list[int]:
        return [int(k.split(":")[1]) for k in self.keys if k != CPU]


def insufficient_memory(message: str) -> ApiError:
    return ApiError(
        409, message, type="invalid_request_error", code="insufficient_memory", param="model_id"
    )


def most_ever(
    *,
    devices: list[int] | None,
    tensor_parallel: int | None,
    cuda_indices: list[int],
    capacity: dict[str, int],
) -> tuple[int, str]:
    """The most memory the placement a spec asks for could offer with nothing else loaded
    (``capacity``: each device key's total), and what it is: a model needing more can never
    load here, as asked."""
    if devices == [] or (devices is None and not cuda_indices):
        return capacity[CPU], CPU
    if devices:
        chosen = [i for i in devices if cuda_key(i) in capacity]
    else:
        by_size = sorted(cuda_indices, key=lambda i: -capacity.get(cuda_key(i), 0))
        chosen = by_size[: tensor_parallel or 1]
    total = sum(capacity.get(cuda_key(i), 0) for i in chosen)
    return total, ",".join(cuda_key(i) for i in chosen) or "the GPUs"


def split_by_room(indices: list[int], room: dict[int, int]) -> tuple[float, ...]:
    """llama.cpp's ``tensor_split``: one fraction per CUDA index up to the highest used,
    proportional to each chosen device's free memory (mismatched cards get their share)."""
    total = sum(max(room[i], 0) for i in indices)
    fractions = [0.0] * (max(indices) + 1)
    for index in indices:
        fractions[index] = max(room[index], 0) / total if total else 1 / len(indices)
    return tuple(fractions)


def place(
    *,
    devices: list[int] | None,
    tensor_parallel: int | None,
    cuda_indices: list[int],
    room: dict[str, int],
    need: int,
) -> Placement:
    """Where a model needing ``need`` bytes goes, given the free bytes (``room``) per device
    key. ``devices == []`` is the CPU; several devices (or ``tensor_parallel > 1``) split the
    layers across GPUs; else the GPU with the most room, or the CPU on a host without GPUs."""
    if devices == [] or (devices is None and not cuda_indices):
        if (tensor_parallel or 1) > 1:
            raise bad_request(
                "tensor_parallel needs GPUs; this placement is the CPU", param="devices"
            )
        if room[CPU] < need:
            raise insufficient_memory(
                f"not enough memory: the model needs ~{need // MB} MB, the CPU budget has "
                f"{max(room[CPU], 0) // MB} MB free"
            )
        return Placement(keys=(CPU,), share=(need,))
    unknown = [i for i in devices or [] if i not in cuda_indices]
    if unknown:
        raise ApiError(
            400,
            f"no CUDA device {unknown[0]} on this host (have {cuda_indices}); devices: [] is "
            "the CPU",
            code="no_such_device",
            param="devices",
        )
    width = len(devices) if devices else (tensor_parallel or 1)
    if tensor_parallel and devices and tensor_parallel != len(devices):
        raise bad_request(
            f"tensor_parallel={tensor_parallel} but {len(devices)} devices listed", param="devices"
        )
    if width > len(cuda_indices):
        raise bad_request(
            f"{width} GPUs asked for, this host has {len(cuda_indices)}", param="tensor_parallel"
        )
    free = {i: room[cuda_key(i)] for i in cuda_indices}
    chosen = list(devices) if devices else sorted(cuda_indices, key=lambda i: -free[i])[:width]
    if width == 1:
        index = chosen[0]
        if free[index] < need:
            raise insufficient_memory(
                f"not enough memory: the model needs ~{need // MB} MB, the best device "
                f"({cuda_key(index)}) has {max(free[index], 0) // MB} MB free"
            )
        return Placement(keys=(cuda_key(index),), share=(need,))
    total = sum(max(free[i], 0) for i in chosen)
    if total < need:
        raise insufficient_memory(
            f"not enough memory: the model needs ~{need // MB} MB, GPUs {chosen} have "
            f"{total // MB} MB free together"
        )
    split = split_by_room(chosen, free)
    return Placement(
        keys=tuple(cuda_key(i) for i in chosen),
        tensor_split=split,
        share=tuple(int(need * split[i]) for i in chosen),
    )


@dataclass(frozen=True)
class PoolSplit:
    """A pooled model's layers: ``n_gpu_layers`` of them (the last ones, and the output
    layer) over llama.cpp's device list — the remote devices first, then the local GPU if
    the local share is on one — in the proportions of ``tensor_split``; on a CPU host the
    first layers, the input embedding and the output layer's weight stay on the CPU."""

    local_bytes: int  # reserved on the local device
    n_gpu_layers: int
    tensor_split: tuple[float, ...]


def pool_split(
    *, n_layer: int, need: int, remote_mb: list[int], local_mb: int | None, local_gpu: bool
) -> PoolSplit:
    """Split a model needing ``need`` bytes over remote devices giving ``remote_mb`` each and
    this host giving ``local_mb`` (None: whatever the remotes leave)."""
    remote = [mb * MB for mb in remote_mb]
    local = max(need - sum(remote), 0) if local_mb is None else local_mb * MB
    total = local + sum(remote)
    if local_gpu:
        shares = [*remote, local]
        return PoolSplit(
            local_bytes=local,
            n_gpu_layers=n_layer + 1,
            tensor_split=tuple(s / total for s in shares),
        )
    # llama.cpp offloads the last n_gpu_layers of the n_layer + 1 (the output one counted);
    # the output layer's weight is kept here all the same (rpc.output_on_cpu): one layer's
    # worth more, roughly.
    offloaded = round((n_layer + 1) * sum(remote) / total) if total else n_layer + 1
    offloaded = min(max(offloaded, len(remote)), n_layer + 1)
    local_share = min(n_layer + 2 - offloaded, n_layer + 1) / (n_layer + 1)
    return PoolSplit(
        local_bytes=int(need * local_share),
        n_gpu_layers=offloaded,
        tensor_split=tuple(r / sum(remote) for r in remote),
    )
