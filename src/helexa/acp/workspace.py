"""File and command access for the tools: through the editor when it advertised ``fs/*``
and ``terminal/*`` at initialize (it sees unsaved buffers and shows live terminals), else
the local disk and a subprocess with a timeout and an output cap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helexa.acp.errors import ToolError
from helexa.acp.files import check_regular, read_text_file, write_text_file

__all__ = ["ClientCaps", "CommandResult", "ToolError", "Workspace"]

# How long kill/release of an editor terminal may take while unwinding: a slow editor must
# not stall a cancel.
CLEANUP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ClientCaps:
    read_text_file: bool = False
    write_text_file: bool = False
    terminal: bool = False

    @classmethod
    def from_acp(cls, caps: Any) -> ClientCaps:
        """From the SDK's ClientCapabilities (or None when the client sent none)."""
        if caps is None:
            return cls()
        fs = getattr(caps, "fs", None)
        return cls(
            read_text_file=bool(fs and fs.read_text_file),
            write_text_file=bool(fs and fs.write_text_file),
            terminal=bool(getattr(caps, "terminal", False)),
        )


@dataclass
class CommandResult:
    output: str
    exit_code: int | None
    signal: str | None = None
    truncated: bool = False
    timed_out: bool = False
    terminal_id: str | None = None


def keep_tail(buffer: bytearray, chunk: bytes, limit: int) -> bool:
    """Append ``chunk`` keeping at most the last ``limit`` bytes; whether any were dropped."""
    buffer.extend(chunk)
    if len(buffer) > limit:
        del buffer[: len(buffer) - limit]
        return True
    return False


def _shell() -> str:
    return shutil.which("bash") or "/bin/sh"


class Workspace:
    def __init__(
        self,
        client: Any | None,
        session_id: str,
        caps: ClientCaps,
        *,
        timeout_s: float = 120.0,
        output_limit: int = 64 * 1024,
        cleanup_timeout_s: float = CLEANUP_TIMEOUT_S,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.caps = caps
        self.timeout_s = timeout_s
        self.output_limit = output_limit
        self.cleanup_timeout_s = cleanup_timeout_s

    async def read_text(self, path: Path, line: int | None = None, limit: int | None = None) -> str:
        if self.client is not None and self.caps.read_text_file:
            if os.path.exists(path):  # else the editor may hold an unsaved buffer of it
                await asyncio.to_thread(check_regular, path)  # never /dev/zero, a FIFO…
            try:
                response = await self.client.read_text_file(
                    session_id=self.session_id, path=str(path), line=line, limit=limit
                )
            except Exception as exc:  # the editor's JSON-RPC error, passed on to the model
                raise ToolError(f"cannot read {path}: {exc}") from exc
            return response.content
        return await asyncio.to_thread(read_text_file, path, line, limit)

    async def read_existing(self, path: Path) -> str | None:
        """The whole file, or None when there is none yet (for diffs and edits)."""
        if not path.exists():
            return None
        return await self.read_text(path)

    async def write_text(self, path: Path, content: str) -> None:
        if self.client is not None and self.caps.write_text_file:
            # Editors differ on creating missing folders; make them so a new file can land.
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
            try:
                await self.client.write_text_file(
                    session_id=self.session_id, path=str(path), content=content
                )
            except Exception as exc:
                raise ToolError(f"cannot write {path}: {exc}") from exc
            return
        await asyncio.to_thread(write_text_file, path, content)

    async def run(
        self,
        command: str,
        cwd: Path,
        on_terminal: Callable[[str], Awaitable[None]] | None = None,
    ) -> CommandResult:
        if not cwd.is_dir():
            raise ToolError(f"working directory {cwd} does not exist")
        if self.client is not None and self.caps.terminal:
            return await self._run_terminal(command, cwd, on_terminal)
        return await self._run_local(command, cwd)

    async def _run_terminal(
        self, command: str, cwd: Path, on_terminal: Callable[[str], Awaitable[None]] | None
    ) -> CommandResult:
        client, sid = self.client, self.session_id
        assert client is not None
        try:
            created = await client.create_terminal(
                session_id=sid,
                command=_shell(),
                args=["-c", command],
                cwd=str(cwd),
                output_byte_limit=self.output_limit,
            )
        except Exception as exc:
            raise ToolError(f"the editor could not start the command: {exc}") from exc
        tid = created.terminal_id
        timed_out = False
        try:
            if on_terminal is not None:
                await on_terminal(tid)
            try:
                status = await asyncio.wait_for(
                    client.wait_for_terminal_exit(session_id=sid, terminal_id=tid), self.timeout_s
                )
                exit_code, sig = status.exit_code, status.signal
            except TimeoutError:
                timed_out = True
                await self._cleanup(client.kill_terminal(session_id=sid, terminal_id=tid))
                exit_code, sig = None, None
            out = await client.terminal_output(session_id=sid, terminal_id=tid)
            if out.exit_status is not None and exit_code is None and sig is None:
                exit_code, sig = out.exit_status.exit_code, out.exit_status.signal
            return CommandResult(out.output, exit_code, sig, out.truncated, timed_out, tid)
        except asyncio.CancelledError:
            await self._cleanup(client.kill_terminal(session_id=sid, terminal_id=tid))
            raise
        except ToolError:
            raise
        except Exception as exc:
            raise ToolError(f"the editor's terminal failed: {exc}") from exc
        finally:
            await self._cleanup(client.release_terminal(session_id=sid, terminal_id=tid))

    async def _cleanup(self, request: Awaitable[Any]) -> None:
        """A best-effort request to the editor, given up after ``cleanup_timeout_s``."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(request, self.cleanup_timeout_s)

    async def _run_local(self, command: str, cwd: Path) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                _shell(),
                "-c",
                command,
                cwd=str(cwd),
                # Never our stdin: that is the protocol stream.
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group, so a kill takes children too
            )
        except OSError as exc:
            raise ToolError(f"cannot start the command: {exc}") from exc
        buffer = bytearray()
        dropped = False

        async def pump() -> None:
            nonlocal dropped
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(65536):
                dropped = keep_tail(buffer, chunk, self.output_limit) or dropped
            await proc.wait()

        timed_out = False
        try:
            await asyncio.wait_for(pump(), self.timeout_s)
        except TimeoutError:
            timed_out = True
            await _kill_group(proc)
        except asyncio.CancelledError:
            await _kill_group(proc)
            raise
        code = proc.returncode
        sig = None
        if code is not None and code < 0:
            sig, code = signal.Signals(-code).name, None
        text = buffer.decode("utf-8", "replace")
        return CommandResult(text, code, sig, dropped, timed_out)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (ours: started with a new session) and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(proc.wait(), 5)
