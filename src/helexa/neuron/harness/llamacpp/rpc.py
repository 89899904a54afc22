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
import os
import socket
from functools import cache
from pathlib import Path

import llama_cpp as C

from helexa.neuron.rpc_gate import keep_alive

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


REFUSAL_WAIT_S = 0.3  # a donor's gate resets a connection it does not admit at once


def reachable(endpoint: str, timeout_s: float = 5.0) -> str | None:
    """Why ``endpoint`` cannot be used from here (None: it can). Asked before ggml
    connects, whose failure would abort the process. The kernel completes a connection
    before the donor's gate sees it, so a refusal shows as a reset just after: an admitted
    connection stays silent (ggml's server waits for the client to speak first)."""
    host, _, port = endpoint.rpartition(":")
    refused = (
        "its gate refused this host: the loan admits other addresses than the one this host "
        "connects from (cortex names a borrower by the host of its URL in cortex.toml)"
    )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            sock.settimeout(REFUSAL_WAIT_S)
            try:
                closed = sock.recv(1) == b""
            except TimeoutError:
                return None
            except ConnectionResetError:
                closed = True
            if closed:
                return refused
            return "it answered before being asked: not a ggml RPC server"
    except ConnectionResetError:  # on loopback the gate's reset can beat connect() back
        return refused
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def keep_alive_connections(endpoints: list[str]) -> int:
    """Turn on TCP keepalive for ggml's connections to ``endpoints`` (it sets none), so a
    donor host that vanishes without a reset (power, network cut) ends the connection,
    and so the worker, instead of leaving a decode waiting forever. Returns how many."""
    wanted = set()
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        for info in socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM):
            wanted.add((str(info[4][0]), int(info[4][1])))
    done = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:  # a duplicate: the options are the socket's, closing it closes the dup
            try:
                if sock.type != socket.SOCK_STREAM or sock.getpeername()[:2] not in wanted:
                    continue
            except OSError:
                continue
            keep_alive(sock)
            done += 1
    return done


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
