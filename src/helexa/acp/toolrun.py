"""Running one tool call: parse, show, ask (per the mode), execute, report.

Whatever goes wrong comes back as a failed ``ToolOutcome`` whose text the model reads; the
loop never sees an exception from here except cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helexa.acp import localfs
from helexa.acp.display import (
    Content,
    cap,
    diff_content,
    error_text,
    fenced,
    terminal_content,
    text_content,
)
from helexa.acp.policy import Verdict, decide, is_allowed, remembered_after
from helexa.acp.store import StoredSession
from helexa.acp.tools import (
    TOOLS,
    BashArgs,
    CallView,
    EditFileArgs,
    GrepArgs,
    ListDirArgs,
    ReadFileArgs,
    ToolArgError,
    WriteFileArgs,
    describe,
    fallback_view,
    parse_args,
    resolve_path,
)
from helexa.acp.ui import Ui
from helexa.acp.workspace import CommandResult, ToolError, Workspace
from helexa.core.stream import ToolCall

log = logging.getLogger("helexa.acp.tools")


@dataclass
class ToolOutcome:
    ok: bool
    text: str  # the tool message the model reads
    content: list[Content] = field(default_factory=list)  # shown, and stored for replay
    live_content: list[Content] | None = None  # shown now instead (a live terminal)

    @property
    def status(self) -> str:
        return "completed" if self.ok else "failed"


def failure(message: str) -> ToolOutcome:
    return ToolOutcome(False, error_text(message), [text_content(message)])


def apply_edit(text: str, old: str, new: str, path: Path) -> str:
    """``text`` with its one occurrence of ``old`` replaced (pure); ToolError otherwise."""
    count = text.count(old)
    if count == 0:
        raise ToolError(f"`old` text not found in {path}; read the file and copy it exactly")
    if count > 1:
        raise ToolError(
            f"`old` text occurs {count} times in {path}; include more surrounding lines "
            "so it occurs exactly once"
        )
    return text.replace(old, new, 1)


def describe_command(command: str, result: CommandResult, timeout_s: float) -> str:
    """A command's result for the model (pure)."""
    lines = [f"$ {command}"]
    if result.truncated:
        lines.append("[output truncated: only the end is shown]")
    lines.append(result.output.rstrip("\n") if result.output.strip() else "(no output)")
    if result.timed_out:
        lines.append(f"[timed out after {timeout_s:.0f}s and was killed]")
    elif result.signal:
        lines.append(f"[killed by {result.signal}]")
    else:
        lines.append(f"[exit code {result.exit_code}]")
    return "\n".join(lines)


class ToolRunner:
    def __init__(
        self, workspace: Workspace, ui: Ui, session: StoredSession, *, output_limit: int
    ) -> None:
        self.ws = workspace
        self.ui = ui
        self.session = session
        self.output_limit = output_limit

    @property
    def cwd(self) -> Path:
        return Path(self.session.cwd)

    async def dispatch(self, call: ToolCall) -> ToolOutcome:
        started = time.monotonic()
        outcome, verdict = await self._attempt(call)
        await self.ui.tool_update(
            call.id,
            status=outcome.status,
            content=outcome.live_content if outcome.live_content is not None else outcome.content,
        )
        log.info(
            "tool",
            extra={
                "session_id": self.session.id,
                "tool": call.name,
                "call_id": call.id,
                "status": outcome.status,
                "permission": verdict,
                "mode": self.session.mode,
                "ms": int((time.monotonic() - started) * 1000),
                "result_chars": len(outcome.text),
            },
        )
        return outcome

    async def _attempt(self, call: ToolCall) -> tuple[ToolOutcome, str]:
        """(the outcome, how permission was decided); every failure but cancellation is an
        outcome the model reads, so one bad call never ends the turn."""
        try:
            args = parse_args(call.name, call.arguments)
        except ToolArgError as exc:
            # Shown as the model wrote it: parsed, "[[[…" can be too deep to serialize.
            await self.ui.tool_start(call.id, fallback_view(call.name), call.arguments)
            return failure(str(exc)), "-"
        try:
            view = describe(call.name, args, self.cwd)
            await self.ui.tool_start(call.id, view, args.model_dump(exclude_none=True))
            return await self._run(call, args, view)
        except ToolError as exc:
            return failure(str(exc)), "-"
        except Exception as exc:  # a NUL in a path or a command (ValueError), and the like
            log.warning("tool error", extra={"tool": call.name, "err": repr(exc)}, exc_info=True)
            return failure(f"{call.name} failed: {type(exc).__name__}: {exc}"), "error"

    async def _gate(
        self, call: ToolCall, view: CallView, preview: list[Content]
    ) -> tuple[str | None, str]:
        """(None when the call may run, else why not for the model; how it was decided)."""
        spec = TOOLS[call.name]
        always = set(self.session.always_allowed)
        decision = decide(self.session.mode, spec.tool_class, view.target, self.cwd, always)
        if decision.verdict is Verdict.ALLOW:
            return None, "allowed"
        if decision.verdict is Verdict.DENY:
            return decision.reason, "refused"
        try:
            option = await self.ui.ask_permission(call.id, view, preview)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return f"could not ask the user for permission ({exc}); not run", "ask_failed"
        if is_allowed(option):
            self.session.always_allowed = sorted(
                remembered_after(option or "", spec.tool_class, always)
            )
            return None, f"asked:{option}"
        refusal = (
            f"Permission denied: the user denied this {call.name} call. Do not retry it "
            "unchanged; ask the user how to proceed."
        )
        return refusal, f"asked:{option or 'cancelled'}"

    async def _run(self, call: ToolCall, args: Any, view: CallView) -> tuple[ToolOutcome, str]:
        if isinstance(args, ReadFileArgs):
            return await self._read_file(args), "free"
        if isinstance(args, ListDirArgs):
            path = resolve_path(self.cwd, args.path)
            text = await asyncio.to_thread(localfs.list_dir, path)
            return ToolOutcome(True, cap(text, self.output_limit), [text_content(fenced(text))]), (
                "free"
            )
        if isinstance(args, GrepArgs):
            root = resolve_path(self.cwd, args.path or ".")
            text = await asyncio.to_thread(localfs.grep, args.pattern, root, self.cwd)
            return ToolOutcome(True, cap(text, self.output_limit), [text_content(fenced(text))]), (
                "free"
            )
        if isinstance(args, WriteFileArgs | EditFileArgs):
            return await self._write(call, args, view)
        if isinstance(args, BashArgs):
            return await self._bash(call, args, view)
        raise ToolError(f"unknown tool {call.name!r}")

    async def _read_file(self, args: ReadFileArgs) -> ToolOutcome:
        path = resolve_path(self.cwd, args.path)
        text = await self.ws.read_text(path, args.line, args.limit)
        shown = text if text else "(empty)"
        model_text = cap(shown, self.output_limit, "read a smaller range with line/limit")
        return ToolOutcome(True, model_text, [text_content(fenced(shown))])

    async def _write(
        self, call: ToolCall, args: WriteFileArgs | EditFileArgs, view: CallView
    ) -> tuple[ToolOutcome, str]:
        path = resolve_path(self.cwd, args.path)
        old_text = await self.ws.read_existing(path)
        if isinstance(args, EditFileArgs):
            if old_text is None:
                raise ToolError(f"{path}: no such file (use write_file to create one)")
            new_text = apply_edit(old_text, args.old, args.new, path)
        else:
            new_text = args.content
        diff = [diff_content(str(path), old_text, new_text)]
        refusal, verdict = await self._gate(call, view, diff)
        if refusal is not None:
            return failure(refusal), verdict
        await self.ui.tool_update(call.id, status="in_progress")
        if isinstance(args, EditFileArgs):
            # The user may have changed the file while the prompt was up: edit what is there
            # now, never write back the snapshot.
            old_text, new_text = await self._reapply(path, args)
            diff = [diff_content(str(path), old_text, new_text)]
        await self.ws.write_text(path, new_text)
        if isinstance(args, EditFileArgs):
            summary = f"Edited {path}: replaced 1 occurrence."
        else:
            verb = "Created" if old_text is None else "Overwrote"
            summary = f"{verb} {path} ({len(new_text.splitlines())} lines)."
        return ToolOutcome(True, summary, diff), verdict

    async def _reapply(self, path: Path, args: EditFileArgs) -> tuple[str, str]:
        """(the file now, the file edited)."""
        current = await self.ws.read_existing(path)
        if current is None:
            raise ToolError(f"{path} was deleted while waiting for permission; not edited")
        try:
            return current, apply_edit(current, args.old, args.new, path)
        except ToolError as exc:
            raise ToolError(f"{path} changed while waiting for permission: {exc}") from exc

    async def _bash(
        self, call: ToolCall, args: BashArgs, view: CallView
    ) -> tuple[ToolOutcome, str]:
        cwd = resolve_path(self.cwd, args.cwd) if args.cwd else self.cwd
        refusal, verdict = await self._gate(call, view, [text_content(fenced(args.command))])
        if refusal is not None:
            return failure(refusal), verdict
        await self.ui.tool_update(call.id, status="in_progress")
        live: list[Content] | None = None

        async def show_terminal(terminal_id: str) -> None:
            nonlocal live
            live = [terminal_content(terminal_id)]
            await self.ui.tool_update(call.id, status="in_progress", content=live)

        result = await self.ws.run(args.command, cwd, show_terminal)
        text = describe_command(args.command, result, self.ws.timeout_s)
        ok = result.exit_code == 0 and not result.timed_out
        model_text = cap(text, self.output_limit)
        return ToolOutcome(ok, model_text, [text_content(fenced(text))], live), verdict
