"""The gate in front of a donor's RPC server, on loopback sockets: it relays an admitted
peer byte for byte (and counts it), resets one it does not admit before anything reaches
the server, and a borrower's probe tells the two apart."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from helexa.neuron.harness.llamacpp.rpc import reachable
from helexa.neuron.rpc_gate import Gate, bind_first_free
from tests.support.procs import wait_for


class Echo:
    """A stand-in RPC server: echoes what it reads, and counts its connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def start_gate(allowed: list[str]) -> tuple[Gate, Echo, list[dict]]:  # type: ignore[type-arg]
    echo = Echo()
    events: list[dict] = []  # type: ignore[type-arg]
    listener = bind_first_free("127.0.0.1", range(50500, 50520))
    gate = Gate(listener, echo.address, allowed, events.append)
    threading.Thread(target=gate.serve_forever, daemon=True).start()
    return gate, echo, events


@pytest.fixture
def admitted() -> Iterator[tuple[Gate, Echo, list[dict]]]:  # type: ignore[type-arg]
    gate, echo, events = start_gate(["127.0.0.1"])
    yield gate, echo, events
    gate.listener.close()


def endpoint(gate: Gate) -> str:
    host, port = gate.listener.getsockname()
    return f"{host}:{port}"


def test_an_admitted_peer_is_relayed_and_counted(admitted) -> None:  # type: ignore[no-untyped-def]
    gate, echo, events = admitted
    payload = bytes(range(256)) * 4096  # 1 MiB: several relay reads each way
    with socket.create_connection(gate.listener.getsockname()) as sock:
        sock.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            got += sock.recv(1 << 20)
        assert got == payload
    wait_for("the close reported", lambda: any(e["event"] == "closed" for e in events))
    closed = next(e for e in events if e["event"] == "closed")
    assert closed["to_server"] == closed["to_client"] == len(payload)
    assert gate.traffic().to_server == len(payload)
    assert echo.accepted == 1
    assert reachable(endpoint(gate)) is None  # the borrower's probe: admitted


def test_a_peer_not_named_is_reset_before_reaching_the_server() -> None:
    gate, echo, events = start_gate(["127.0.0.2"])
    try:
        why = reachable(endpoint(gate))
        assert why is not None and "refused this host" in why
        with socket.socket() as sock:
            sock.settimeout(5)
            with pytest.raises(ConnectionResetError):
                sock.connect(gate.listener.getsockname())
                sock.sendall(b"hello")
                assert sock.recv(16) != b"", "an EOF, not a reset"
        assert echo.accepted == 0  # nothing reached the server
        wait_for("both refusals reported", lambda: len(events) == 2)
        assert [e["event"] for e in events] == ["refused", "refused"]
    finally:
        gate.listener.close()


def test_nothing_listening_is_said_plainly() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    why = reachable(f"127.0.0.1:{port}")
    assert why is not None and "refused" in why.lower()
