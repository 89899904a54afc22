"""Real daemon processes for tests: free loopback ports, logs on disk, clean stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def wait_for(what: str, check: Callable[[], object], timeout: float = 30) -> None:
    """Polls ``check`` until it is true; fails naming ``what`` after ``timeout`` seconds.
    For what a daemon does after its answer went out (an access-log line, a counter)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    """A console script run as a child process, its output in ``log_path``."""

    def __init__(
        self,
        args: list[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, *, timeout: float = 60.0, ready=None) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited {self.proc.returncode}:\n{self.log()}")
            try:
                response = httpx.get(url, timeout=2)
                if response.status_code == 200 and (ready is None or ready(response.json())):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{url} not ready after {timeout}s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def console_script(name: str) -> str:
    """The venv's console script next to this interpreter."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def start_neuron(
    workdir: Path,
    config_toml: str,
    *,
    hf_cache: Path,
    name: str = "neuron",
    ready_models: bool = True,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[Daemon, str]:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.toml"
    config.write_text(f'host = "127.0.0.1"\nport = {port}\n{config_toml}')
    daemon = Daemon(
        [console_script("neuron"), "--config", str(config)],
        log_path=workdir / f"{name}.log",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache), **(env or {})},
    ).start()
    base = f"http://127.0.0.1:{port}"
    daemon.wait_http(
        f"{base}/health",
        ready=(lambda h: h["activation"]["state"] == "ready") if ready_models else None,
    )
    return daemon, base
