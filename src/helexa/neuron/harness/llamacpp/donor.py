"""A donor process: one device lent to another host's model, for one loan.

``python -m helexa.neuron.harness.llamacpp.donor --device cpu --host ADDR --ports LO-HI
--allow IP[,IP] --events-fd N`` (started by the neuron's ``Lender``): ggml's own RPC server
for the device on a loopback port, and the gate (``helexa.neuron.rpc_gate``) on the fleet
address in front of it, admitting only the borrower. What happens (ready, connections,
refusals) goes to the neuron as JSON lines on ``--events-fd``. ggml's server cannot be
stopped, so the loan ends with this process; it dies with the neuron too.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time

from helexa.core.logs import setup_logging
from helexa.neuron.harness.llamacpp import binding, rpc
from helexa.neuron.rpc_gate import Gate, bind_first_free
from helexa.neuron.worker.lifeline import die_with_parent

log = logging.getLogger("helexa.neuron.donor")

UPSTREAM_HOST = "127.0.0.1"
SERVER_START_S = 30.0


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind((UPSTREAM_HOST, 0))
        return int(sock.getsockname()[1])


def _listening_here(port: int) -> bool:
    """Whether this process (ggml's server thread) listens on the loopback ``port``: read
    from /proc, so a stranger that took the port first is never mistaken for it (and the
    server sees no probe connection)."""
    inodes = set()
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


def _wait_listening(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        if _listening_here(port):
            return
        time.sleep(0.02)
    raise TimeoutError(f"ggml's RPC server did not listen on {UPSTREAM_HOST}:{port}")


def _ports(text: str) -> range:
    lo, _, hi = text.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="helexa-donor")
    parser.add_argument("--device", default="cpu")  # "cpu" or "gpu" (CUDA_VISIBLE_DEVICES)
    parser.add_argument("--host", required=True)
    parser.add_argument("--ports", required=True)
    parser.add_argument("--allow", default="")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--events-fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    die_with_parent()
    events = os.fdopen(args.events_fd, "w", buffering=1)
    lock = threading.Lock()

    def report(event: dict[str, object]) -> None:
        with lock:
            events.write(json.dumps(event) + "\n")

    try:
        listener = bind_first_free(args.host, _ports(args.ports))
        binding.init_backend()
        rpc.local_device(args.device == "gpu")  # fail here, not in the server thread
        port = _free_loopback_port()
        threads = args.threads or binding.usable_cores()
        server = threading.Thread(
            target=rpc.serve,
            args=(f"{UPSTREAM_HOST}:{port}", args.device == "gpu", threads, args.cache_dir),
            daemon=True,
        )
        server.start()
        _wait_listening(port, time.monotonic() + SERVER_START_S)
    except Exception as exc:
        report({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from exc
    host, bound, *_ = listener.getsockname()
    allowed = [a for a in args.allow.split(",") if a]
    report({"event": "ready", "host": host, "port": bound, "pid": os.getpid()})
    log.info(
        "rpc server lent",
        extra={"device": args.device, "endpoint": f"{host}:{bound}", "allow": ",".join(allowed)},
    )
    gate = Gate(listener, (UPSTREAM_HOST, port), allowed, report)
    threading.Thread(target=gate.report_traffic, daemon=True).start()
    gate.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
