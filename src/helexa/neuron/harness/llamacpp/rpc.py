"""ggml's RPC backend through ctypes: the server a donor runs for one of its devices, and
the remote devices a borrower loads a model onto. llama-cpp-python binds neither, so this
binds the few functions of ``ggml-rpc.h`` and ``ggml-backend.h`` the neuron needs from the
libraries llama-cpp-python ships (built with ``GGML_RPC``: scripts/llama-cpp-cmake-args).

ggml's RPC client aborts its process when a server goes away (``RPC_STATUS_ASSERT``), so a
model on remote devices lives in a worker process of its own: a lost donor ends that
process, and only that model.
"""

from __future__ import annotations

import ctypes
import socket
from functools import cache
from pathlib import Path

import llama_cpp as C

DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type
DEVICE_TYPE_GPU = 1


class RpcUnavailable(RuntimeError):
    """This llama-cpp-python was built without ggml's RPC backend."""


def _library_dir() -> Path:
    return Path(C.__file__).parent / "lib"


@cache
def _lib(stem: str) -> ctypes.CDLL:
    for path in sorted(_library_dir().glob(f"lib{stem}.*")):
        if path.suffix in (".so", ".dylib", ".dll") or ".so." in path.name:
            return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    raise RpcUnavailable(f"no lib{stem} beside llama-cpp-python ({_library_dir()})")


@cache
def _functions() -> dict[str, ctypes._CFuncPtr]:
    if not C.llama_supports_rpc():
        raise RpcUnavailable(
            "llama-cpp-python here was built without ggml's RPC backend: reinstall it with "
            "scripts/dev.sh setup (it builds with -DGGML_RPC=ON)"
        )
    rpc, ggml, base = _lib("ggml-rpc"), _lib("ggml"), _lib("ggml-base")
    p = ctypes.c_void_p
    table = {
        "start_server": (rpc.ggml_backend_rpc_start_server, None,
                         [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                          ctypes.POINTER(p)]),
        "add_server": (rpc.ggml_backend_rpc_add_server, p, [ctypes.c_char_p]),
        "reg_dev_count": (base.ggml_backend_reg_dev_count, ctypes.c_size_t, [p]),
        "reg_dev_get": (base.ggml_backend_reg_dev_get, p, [p, ctypes.c_size_t]),
        "dev_by_type": (ggml.ggml_backend_dev_by_type, p, [ctypes.c_int]),
        "cpu_buffer_type": (base.ggml_backend_cpu_buffer_type, p, []),
    }  # fmt: skip
    out = {}
    for name, (fn, restype, argtypes) in table.items():
        fn.restype = restype
        fn.argtypes = argtypes
        out[name] = fn
    return out


def available() -> bool:
    try:
        _functions()
    except (RpcUnavailable, AttributeError):
        return False
    return True


def local_device(gpu: bool) -> ctypes.c_void_p:
    """The device a donor's server exports: the GPU its process sees, or the CPU."""
    fn = _functions()
    dev = fn["dev_by_type"](DEVICE_TYPE_GPU if gpu else DEVICE_TYPE_CPU)
    if not dev:
        raise RpcUnavailable(f"llama.cpp here has no {'GPU' if gpu else 'CPU'} device")
    return dev


def serve(endpoint: str, gpu: bool, threads: int, cache_dir: str | None = None) -> None:
    """Run ggml's RPC server for this process's device at ``endpoint`` (``host:port``).
    It never returns: the donor process is ended to stop it."""
    devices = (ctypes.c_void_p * 1)(local_device(gpu))
    _functions()["start_server"](
        endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, 1, devices
    )


def reachable(endpoint: str, timeout_s: float = 5.0) -> str | None:
    """Why ``endpoint`` cannot be reached (None: it can). Asked before ggml connects, whose
    failure to connect would abort the process."""
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    return None


class BufferOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override``: tensors matching ``pattern`` go to
    ``buft``; a list of them ends with a NULL pattern."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# The output matmul's weight: "output.weight", or the token embedding it is tied to.
OUTPUT_WEIGHT = rb"^(output|token_embd)\.weight$"


def output_on_cpu() -> ctypes.Array[BufferOverride]:
    """Overrides that keep the output layer's weight in this host's memory. llama.cpp puts
    the output layer on the last device of a split, a remote one when this host has no
    GPU: each token's logits (vocabulary x 4 bytes) would then cross the network, where
    with the weight here only the hidden state does (embedding width x 4 bytes)."""
    cpu = _functions()["cpu_buffer_type"]()
    return (BufferOverride * 2)(BufferOverride(OUTPUT_WEIGHT, cpu), BufferOverride(None, None))


def remote_devices(endpoints: list[str]) -> list[ctypes.c_void_p]:
    """One llama.cpp device per endpoint (each donor's server exports one), in order."""
    fn = _functions()
    devices = []
    for endpoint in endpoints:
        reg = fn["add_server"](endpoint.encode())
        count = fn["reg_dev_count"](reg) if reg else 0
        if not count:
            raise RpcUnavailable(f"the RPC server at {endpoint} exports no device")
        devices.extend(fn["reg_dev_get"](reg, i) for i in range(count))
    return devices
