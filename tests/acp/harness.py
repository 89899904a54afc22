"""An ACP client for the end-to-end tests: it spawns the real `helexa-acp` console script
and talks to it over stdio with the ACP SDK's client side, as an editor does. It serves
fs/* from the real disk and terminal/* with real subprocesses, answers permission
requests as a test asks, and records every message the agent sends, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acp import connect_to_agent
from acp.client.connection import ClientSideConnection
from acp.connection import StreamDirection, StreamEvent
from acp.schema import (
    AllowedOutcome,
    ClientCapabilities,
    CreateTerminalResponse,
    DeniedOutcome,
    EnvVariable,
    FileSystemCapabilities,
    KillTerminalResponse,
    PermissionOption,
    ReadTextFileResponse,
    ReleaseTerminalResponse,
    RequestPermissionResponse,
    TerminalExitStatus,
    TerminalOutputResponse,
    TextContentBlock,
    ToolCallUpdate,
    WaitForTerminalExitResponse,
    WriteTextFileResponse,
)

from tests.support.procs import console_script

STEP = 30.0  # the most any one protocol step may take before a test calls it a hang
PERMISSION_IDS = {"allow_once", "allow_always", "reject_once"}


@dataclass
class Terminal:
    proc: asyncio.subprocess.Process
    output: bytearray = field(default_factory=bytearray)
    reader: asyncio.Task[None] | None = None


class TestClient:
    """The editor side. ``answer`` is the permission option the "user" picks
    (allow_once, allow_always, reject_once) or "cancelled" to dismiss the prompt."""

    __test__ = False  # not a pytest class

    def __init__(self, *, answer: str = "allow_once", fs: bool = True, terminal: bool = True):
        self.answer = answer
        self.fs = fs
        self.terminal = terminal
        self.messages: list[dict[str, Any]] = []  # every message from the agent, in order
        self.permissions: list[tuple[dict[str, Any], list[str]]] = []  # (toolCall, option ids)
        self.terminals: dict[str, Terminal] = {}
        self.commands: list[dict[str, Any]] = []  # terminal/create params

    # -- what the agent sent ------------------------------------------------------------

    def observe(self, event: StreamEvent) -> None:
        if event.direction == StreamDirection.INCOMING and "method" in event.message:
            self.messages.append(event.message)

    def requests(self, method: str) -> list[dict[str, Any]]:
        return [m["params"] for m in self.messages if m["method"] == method]

    def updates(self, session_id: str | None = None, kind: str | None = None) -> list[dict]:
        """The session/update payloads (``update`` objects), optionally of one kind."""
        return [
            p["update"]
            for p in self.requests("session/update")
            if (session_id is None or p["sessionId"] == session_id)
            and (kind is None or p["update"].get("sessionUpdate") == kind)
        ]

    def text(self, session_id: str | None = None, kind: str = "agent_message_chunk") -> str:
        return "".join(
            u["content"].get("text", "")
            for u in self.updates(session_id, kind)
            if isinstance(u.get("content"), dict)
        )

    def tool_calls(self, session_id: str | None = None) -> dict[str, dict[str, Any]]:
        """Each tool call's merged state (tool_call then its tool_call_updates), by id; the
        content of every update is kept in ``contents``, the statuses in ``statuses``."""
        calls: dict[str, dict[str, Any]] = {}
        for u in self.updates(session_id):
            if u.get("sessionUpdate") not in ("tool_call", "tool_call_update"):
                continue
            call = calls.setdefault(u["toolCallId"], {"contents": [], "statuses": [], "kinds": []})
            call["kinds"].append(u["sessionUpdate"])
            call.update({k: v for k, v in u.items() if k not in ("content", "status")})
            if u.get("status"):
                call["statuses"].append(u["status"])
                call["status"] = u["status"]
            call["contents"] += u.get("content") or []
        return calls

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = STEP) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"condition not met in {timeout}s")
            await asyncio.sleep(0.05)

    # -- the Client interface -----------------------------------------------------------

    async def request_permission(
        self,
        session_id: str,
        tool_call: ToolCallUpdate,
        options: list[PermissionOption],
        **kwargs: Any,
    ) -> RequestPermissionResponse:
        ids = [o.option_id for o in options]
        self.permissions.append((tool_call.model_dump(by_alias=True, exclude_none=True), ids))
        if self.answer == "cancelled" or self.answer not in ids:
            return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))
        return RequestPermissionResponse(
            outcome=AllowedOutcome(outcome="selected", option_id=self.answer)
        )

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        return None  # recorded in order by observe()

    async def read_text_file(
        self,
        session_id: str,
        path: str,
        line: int | None = None,
        limit: int | None = None,
        **kwargs: Any,
    ) -> ReadTextFileResponse:
        lines = Path(path).read_text().splitlines(keepends=True)
        start = max((line or 1) - 1, 0)
        end = start + limit if limit is not None else None
        return ReadTextFileResponse(content="".join(lines[start:end]))

    async def write_text_file(
        self, session_id: str, path: str, content: str, **kwargs: Any
    ) -> WriteTextFileResponse:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(content)
        return WriteTextFileResponse()

    async def create_terminal(
        self,
        session_id: str,
        command: str,
        args: list[str] | None = None,
        env: list[EnvVariable] | None = None,
        cwd: str | None = None,
        output_byte_limit: int | None = None,
        **kwargs: Any,
    ) -> CreateTerminalResponse:
        self.commands.append({"command": command, "args": args or [], "cwd": cwd})
        environ = {**os.environ, **{v.name: v.value for v in env or []}}
        common: dict[str, Any] = {
            "cwd": cwd,
            "env": environ,
            "stdout": asyncio.subprocess.PIPE,
            "stderr": asyncio.subprocess.STDOUT,
            "stdin": asyncio.subprocess.DEVNULL,
        }
        if args:
            proc = await asyncio.create_subprocess_exec(command, *args, **common)
        else:
            proc = await asyncio.create_subprocess_shell(command, **common)
        term = Terminal(proc)

        async def pump() -> None:
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(4096):
                term.output += chunk

        term.reader = asyncio.create_task(pump())
        terminal_id = f"term-{len(self.terminals)}"
        self.terminals[terminal_id] = term
        return CreateTerminalResponse(terminal_id=terminal_id)

    def _status(self, term: Terminal) -> TerminalExitStatus | None:
        code = term.proc.returncode
        if code is None:
            return None
        return TerminalExitStatus(exit_code=code if code >= 0 else None, signal=None)

    async def terminal_output(
        self, session_id: str, terminal_id: str, **kwargs: Any
    ) -> TerminalOutputResponse:
        term = self.terminals[terminal_id]
        return TerminalOutputResponse(
            output=term.output.decode(errors="replace"),
            truncated=False,
            exit_status=self._status(term),
        )

    async def wait_for_terminal_exit(
        self, session_id: str, terminal_id: str, **kwargs: Any
    ) -> WaitForTerminalExitResponse:
        term = self.terminals[terminal_id]
        code = await term.proc.wait()
        if term.reader is not None:
            await term.reader
        return WaitForTerminalExitResponse(exit_code=code if code >= 0 else None)

    async def kill_terminal(
        self, session_id: str, terminal_id: str, **kwargs: Any
    ) -> KillTerminalResponse:
        term = self.terminals[terminal_id]
        if term.proc.returncode is None:
            term.proc.kill()
        return KillTerminalResponse()

    async def release_terminal(
        self, session_id: str, terminal_id: str, **kwargs: Any
    ) -> ReleaseTerminalResponse:
        term = self.terminals.pop(terminal_id, None)
        if term is not None and term.proc.returncode is None:
            term.proc.kill()
            await term.proc.wait()
        return ReleaseTerminalResponse()

    async def ext_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def ext_notification(self, method: str, params: dict[str, Any]) -> None:
        return None

    def capabilities(self) -> ClientCapabilities:
        return ClientCapabilities(
            fs=FileSystemCapabilities(read_text_file=self.fs, write_text_file=self.fs),
            terminal=self.terminal,
        )


def agent_env(
    root: Path, base_url: str, *, model: str = "scripted/qwen", config: str = "", **extra: str
) -> dict[str, str]:
    """What an editor would pass: only PATH from here, everything else under ``root``;
    ``config`` is the text of the config file HELEXA_ACP_CONFIG names."""
    for name in ("home", "data", "config"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "config" / "helexa-acp.toml").write_text(config)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root / "home"),
        "PYTHONUNBUFFERED": "1",
        "HELEXA_ACP_BASE_URL": base_url,
        "HELEXA_ACP_MODEL": model,
        "HELEXA_ACP_API_KEY": "sk-test-key",
        "HELEXA_ACP_LOG_FILE": str(root / "agent.log"),
        "HELEXA_ACP_CONFIG": str(root / "config" / "helexa-acp.toml"),
        "XDG_DATA_HOME": str(root / "data"),
        "XDG_CONFIG_HOME": str(root / "config"),
    }
    env.update(extra)
    return env


def sessions_dir(env: dict[str, str]) -> Path:
    return Path(env["XDG_DATA_HOME"]) / "helexa-acp" / "sessions"


@dataclass
class Running:
    conn: ClientSideConnection
    proc: asyncio.subprocess.Process
    client: TestClient
    stderr_path: Path
    init: dict[str, Any] = field(default_factory=dict)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def new_session(self, cwd: Path) -> Any:
        return await step(self.conn.new_session(cwd=str(cwd), mcp_servers=[]))

    async def prompt(self, session_id: str, text: str, timeout: float = STEP) -> str:
        """One prompt turn; its stopReason."""
        blocks = [TextContentBlock(type="text", text=text)]
        response = await step(self.conn.prompt(session_id=session_id, prompt=blocks), timeout)
        return response.stop_reason


async def step(awaitable: Any, timeout: float = STEP) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


@contextlib.asynccontextmanager
async def running_agent(
    env: dict[str, str], cwd: Path, client: TestClient | None = None
) -> AsyncIterator[Running]:
    """helexa-acp as a child process, initialized; stderr in ``$HOME/../stderr-N.log``."""
    client = client or TestClient()
    root = Path(env["HOME"]).parent
    index = len(list(root.glob("stderr-*.log")))
    stderr_path = root / f"stderr-{index}.log"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            console_script("helexa-acp"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=str(cwd),
            limit=50 * 1024 * 1024,
        )
    assert proc.stdin is not None and proc.stdout is not None
    conn = connect_to_agent(client, proc.stdin, proc.stdout, observers=[client.observe])
    running = Running(conn, proc, client, stderr_path)
    try:
        response = await step(
            conn.initialize(protocol_version=1, client_capabilities=client.capabilities())
        )
        running.init = response.model_dump(by_alias=True, exclude_none=True)
        yield running
    finally:
        await conn.close()
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for term in client.terminals.values():
            if term.proc.returncode is None:
                term.proc.kill()


def dump(running: Running) -> str:
    """Everything useful when a test fails: the messages and the agent's stderr."""
    return (
        json.dumps(running.client.messages, indent=1)[-6000:]
        + "\n--- stderr:\n"
        + (running.stderr()[-4000:])
    )
