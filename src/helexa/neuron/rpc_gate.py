"""The door in front of a donor's ggml RPC server.

ggml's RPC protocol has no authentication: whoever connects can allocate memory on the
device and run graphs on it. So the RPC server itself listens on loopback only, and this
gate listens on the fleet address. A connection from an address the loan does not name is
reset at once, before a byte reaches the RPC server (before its handshake); one from the
borrower is relayed byte for byte to the server, a thread per direction (the GIL is let go
in every ``recv``/``sendall``, so the relay costs a thread wake-up per message).

It counts what it relays, so the donor can report a loan's traffic and the bench the
network cost per token, and it reports each connection's start and end: a loan ends when
its borrower has been gone a while.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("helexa.neuron.rpc_gate")

RELAY_CHUNK = 1 << 20  # bytes read at once: a tensor upload streams through in big pieces
Report = Callable[[dict[str, object]], None]


def normalized(address: str) -> str:
    """An IP as the allowlist spells it: IPv4-mapped IPv6 (``::ffff:10.0.0.2``, what a dual
    stack socket reports) as plain IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def admitted(peer: str, allowed: Iterable[str]) -> bool:
    """Whether a connection from ``peer`` may reach the RPC server: only from the addresses
    the loan names (never a wildcard: an empty list admits no one)."""
    return normalized(peer) in {normalized(a) for a in allowed}


def resolve(host: str) -> list[str]:
    """The IPs a borrower's host name stands for (an IP stays itself)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({normalized(str(info[4][0])) for info in infos})


@dataclass
class Traffic:
    """Bytes and reads relayed on one connection; a read is about one RPC message."""

    to_server: int = 0
    to_client: int = 0
    reads_to_server: int = 0
    reads_to_client: int = 0


def bind_first_free(host: str, ports: range) -> socket.socket:
    """A listening socket on the first free port of ``ports`` at ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last: OSError | None = None
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:  # two loans binding at once may both bind one port: listen decides
            sock.bind((host, port))
            sock.listen(8)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise OSError(f"no free port in {ports.start}-{ports.stop - 1} on {host}: {last}")


KEEPALIVE_IDLE_S = 10  # a peer that vanished (power, network cut) is noticed within
KEEPALIVE_PROBES = 3  # idle + probes x interval, or unacknowledged data for USER_TIMEOUT
KEEPALIVE_INTERVAL_S = 5
USER_TIMEOUT_MS = 30_000


def keep_alive(conn: socket.socket) -> None:
    """A peer gone without a FIN or a reset would hold a connection open forever (a loan on
    the donor's side, a decode on the borrower's): TCP keepalive, and a bound on
    unacknowledged data, turn its silence into a closed connection."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS),
    )
    for name, value in options:
        if hasattr(socket, name):  # Linux
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset: the peer sees its connection refused, not a slow EOF."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class Gate:
    def __init__(
        self,
        listener: socket.socket,
        upstream: tuple[str, int],
        allowed: Iterable[str],
        report: Report,
    ) -> None:
        self.listener = listener
        self.upstream = upstream
        self.allowed = frozenset(normalized(a) for a in allowed)
        self.report = report
        self.closed = Traffic()  # what connections that ended relayed
        self._open: dict[int, Traffic] = {}
        self._lock = threading.Lock()

    def traffic(self) -> Traffic:
        """Everything relayed so far, open connections included."""
        with self._lock:
            parts = [self.closed, *self._open.values()]
        total = Traffic()
        for part in parts:
            total.to_server += part.to_server
            total.to_client += part.to_client
            total.reads_to_server += part.reads_to_server
            total.reads_to_client += part.reads_to_client
        return total

    def report_traffic(self, every_s: float = 1.0) -> None:
        """A thread's loop: the totals to the neuron whenever they changed."""
        last = None
        while True:
            time.sleep(every_s)
            now = self.traffic()
            if now != last:
                self.report({"event": "traffic", **now.__dict__})
                last = now

    def serve_forever(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # the listener is gone: the loan is over
                log.warning("rpc accept failed", extra={"error": str(exc)})
                time.sleep(0.1)  # out of descriptors, a connection aborted: not the end
                continue
            address = normalized(str(peer[0]))
            if not admitted(address, self.allowed):
                _reset(conn)
                log.warning("rpc connection refused", extra={"peer": address})
                self.report({"event": "refused", "peer": address})
                continue
            threading.Thread(target=self._serve, args=(conn, address), daemon=True).start()

    def _serve(self, conn: socket.socket, address: str) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError as exc:
            _reset(conn)
            self.report({"event": "failed", "peer": address, "error": str(exc)})
            return
        for sock in (conn, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keep_alive(conn)
        traffic = Traffic()
        with self._lock:
            self._open[id(traffic)] = traffic
        self.report({"event": "connected", "peer": address})
        back = threading.Thread(
            target=self._relay, args=(server, conn, traffic, False), daemon=True
        )
        back.start()
        self._relay(conn, server, traffic, True)
        back.join()
        for sock in (conn, server):
            sock.close()
        with self._lock:
            del self._open[id(traffic)]
            self.closed.to_server += traffic.to_server
            self.closed.to_client += traffic.to_client
            self.closed.reads_to_server += traffic.reads_to_server
            self.closed.reads_to_client += traffic.reads_to_client
        self.report({"event": "closed", "peer": address, **traffic.__dict__})

    @staticmethod
    def _relay(src: socket.socket, dst: socket.socket, traffic: Traffic, inbound: bool) -> None:
        buffer = bytearray(RELAY_CHUNK)
        view = memoryview(buffer)
        try:
            while True:
                n = src.recv_into(buffer)
                if not n:
                    break
                dst.sendall(view[:n])
                if inbound:
                    traffic.to_server += n
                    traffic.reads_to_server += 1
                else:
                    traffic.to_client += n
                    traffic.reads_to_client += 1
        except OSError:
            pass
        # Either side gone: end both directions (the other relay thread wakes with EOF).
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
