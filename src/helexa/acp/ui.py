"""What the agent loop shows the editor: a narrow interface (``Ui``) and its ACP
implementation over the SDK connection (``session/update``, ``session/request_permission``)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from acp import (
    start_tool_call,
    update_agent_message_text,
    update_agent_thought_text,
    update_tool_call,
)
from acp.schema import (
    AllowedOutcome,
    PermissionOption,
    ToolCallLocation,
    ToolCallUpdate,
    UsageUpdate,
)

from helexa.acp.display import Content
from helexa.acp.policy import ALLOW_ALWAYS, ALLOW_ONCE, REJECT_ONCE
from helexa.acp.tools import CallView

log = logging.getLogger("helexa.acp.ui")

PERMISSION_OPTIONS = (
    PermissionOption(option_id=ALLOW_ONCE, name="Allow", kind="allow_once"),
    PermissionOption(option_id=ALLOW_ALWAYS, name="Always allow", kind="allow_always"),
    PermissionOption(option_id=REJECT_ONCE, name="Reject", kind="reject_once"),
)


class Ui(Protocol):
    async def message(self, text: str) -> None: ...

    async def thought(self, text: str) -> None: ...

    async def tool_start(self, call_id: str, view: CallView, raw_input: Any) -> None: ...

    async def tool_update(
        self,
        call_id: str,
        *,
        status: str | None = None,
        content: list[Content] | None = None,
        raw_output: Any = None,
    ) -> None: ...

    async def ask_permission(
        self, call_id: str, view: CallView, content: list[Content]
    ) -> str | None: ...

    async def usage(self, used: int, size: int) -> None: ...


def locations(view: CallView) -> list[ToolCallLocation]:
    return [ToolCallLocation(path=path, line=line) for path, line in view.locations]


class AcpUi:
    """``Ui`` over an ``acp`` client connection (the ``Client`` given to ``on_connect``)."""

    def __init__(self, conn: Any, session_id: str) -> None:
        self.conn = conn
        self.session_id = session_id

    async def _send(self, update: Any) -> None:
        await self.conn.session_update(session_id=self.session_id, update=update)

    async def message(self, text: str) -> None:
        await self._send(update_agent_message_text(text))

    async def thought(self, text: str) -> None:
        await self._send(update_agent_thought_text(text))

    async def tool_start(self, call_id: str, view: CallView, raw_input: Any) -> None:
        await self._send(
            start_tool_call(
                call_id,
                view.title,
                kind=view.kind,  # type: ignore[arg-type]
                status="pending",
                locations=locations(view) or None,
                raw_input=raw_input,
            )
        )

    async def tool_update(
        self,
        call_id: str,
        *,
        status: str | None = None,
        content: list[Content] | None = None,
        raw_output: Any = None,
    ) -> None:
        await self._send(
            update_tool_call(
                call_id,
                status=status,  # type: ignore[arg-type]
                content=content,  # type: ignore[arg-type]  # dicts: the model validates them
                raw_output=raw_output,
            )
        )

    async def ask_permission(
        self, call_id: str, view: CallView, content: list[Content]
    ) -> str | None:
        """The option the user picked, or None (the client cancelled the request)."""
        request = ToolCallUpdate(
            tool_call_id=call_id,
            title=view.title,
            kind=view.kind,  # type: ignore[arg-type]
            status="pending",
            content=content or None,  # type: ignore[arg-type]
            locations=locations(view) or None,
        )
        response = await self.conn.request_permission(
            session_id=self.session_id, tool_call=request, options=list(PERMISSION_OPTIONS)
        )
        outcome = response.outcome
        return outcome.option_id if isinstance(outcome, AllowedOutcome) else None

    async def usage(self, used: int, size: int) -> None:
        await self._send(UsageUpdate(session_update="usage_update", used=used, size=size))
