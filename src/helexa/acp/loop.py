"""The agent loop for one prompt: rounds of model call → tools → results until the model
stops calling tools, runs out of tokens, or the round limit is reached.

The session is saved after every round (and when the turn ends however it ends), so a crash
or a kill loses at most the round in flight. Cancellation (``session/cancel``, or a new
prompt on the session) arrives as ``CancelledError`` in the task running ``Turn.run``: the
HTTP stream closes as the stack unwinds, the history is left consistent (every tool call
answered), and the turn ends with stop reason ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from helexa.acp.config import EndpointConfig
from helexa.acp.context import request_messages
from helexa.acp.display import error_text, for_storage, text_content
from helexa.acp.endpoint import Endpoint, EndpointError
from helexa.acp.store import StoredSession
from helexa.acp.toolrun import ToolOutcome, ToolRunner
from helexa.acp.tools import openai_tools
from helexa.acp.ui import Ui
from helexa.core.stream import (
    Finish,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallAccumulator,
    ToolCallDelta,
    Usage,
)

log = logging.getLogger("helexa.acp.loop")

_STOP_FOR_FINISH = {"length": "max_tokens", "refusal": "refusal"}


@dataclass
class TurnResult:
    stop_reason: str
    input_tokens: int = 0
    output_tokens: int = 0


def stop_reason_for(finish: str | None, has_calls: bool) -> str | None:
    """The turn's stop reason after a round, or None to run the tools and go on (pure)."""
    if finish in _STOP_FOR_FINISH:
        return _STOP_FOR_FINISH[finish]
    return None if has_calls else "end_turn"


def assistant_message(text: str, reasoning: str, calls: list[ToolCall]) -> dict[str, Any] | None:
    """The stored assistant message for a round; None when it said nothing at all."""
    if not text and not reasoning and not calls:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [c.to_openai() for c in calls]
    if reasoning:
        message["_reasoning"] = reasoning
    return message


def tool_message(call_id: str, outcome: ToolOutcome) -> dict[str, Any]:
    return {
        "role": "tool",
        "tool_call_id": call_id,
        "content": outcome.text,
        "_status": outcome.status,
        "_content": for_storage(outcome.content),
    }


def unanswered_calls(history: list[dict[str, Any]]) -> list[str]:
    """Ids of the last assistant message's tool calls that have no result yet (pure)."""
    for index in range(len(history) - 1, -1, -1):
        message = history[index]
        if message.get("role") == "assistant":
            answered = {m.get("tool_call_id") for m in history[index + 1 :]}
            ids = [c.get("id") for c in message.get("tool_calls") or []]
            return [i for i in ids if i not in answered]
    return []


class Turn:
    def __init__(
        self,
        *,
        session: StoredSession,
        endpoint: Endpoint,
        endpoint_config: EndpointConfig,
        tools: ToolRunner,
        ui: Ui,
        save: Callable[[], Awaitable[None]],
        max_rounds: int,
    ) -> None:
        self.session = session
        self.endpoint = endpoint
        self.config = endpoint_config
        self.tools = tools
        self.ui = ui
        self.save = save
        self.max_rounds = max_rounds
        self.result = TurnResult("end_turn")
        # What the model has streamed in the round in flight (kept if it is cancelled).
        self._text: list[str] = []
        self._reasoning: list[str] = []

    async def run(self, user: dict[str, Any]) -> TurnResult:
        # A process killed mid-round may have left calls without results: answer them, or
        # the endpoint would reject the conversation.
        self._answer_unanswered("interrupted: the agent stopped before this call finished")
        self.session.messages.append(user)
        await self.save()
        try:
            for number in range(1, self.max_rounds + 1):
                stop = await self._round(number)
                await self.save()
                if stop is not None:
                    self.result.stop_reason = stop
                    return self.result
            await self._say(f"\n\n(stopped: the round limit of {self.max_rounds} was reached)")
            self.result.stop_reason = "max_turn_requests"
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # cancellation handled: this turn ends "cancelled"
            await self._settle_cancelled()
            self.result.stop_reason = "cancelled"
        except EndpointError as exc:
            await self._fail(str(exc), "endpoint")
        except Exception as exc:  # a bug of ours: say so, keep the session usable
            log.exception("turn failed", extra={"session_id": self.session.id})
            await self._fail(f"helexa-acp internal error: {type(exc).__name__}: {exc}", "internal")
        finally:
            await self.save()
        return self.result

    async def _round(self, number: int) -> str | None:
        started = time.monotonic()
        tools = openai_tools()
        messages, max_tokens = request_messages(
            self.session.messages,
            self.session.cwd,
            self.session.mode,
            tools,
            self.config.context_window,
            self.config.max_tokens,
        )
        self._text, self._reasoning = [], []
        calls = ToolCallAccumulator()
        finish: str | None = None
        usage: Usage | None = None
        async for event in self.endpoint.stream(messages, tools, self.session.model, max_tokens):
            if isinstance(event, TextDelta):
                self._text.append(event.text)
                await self.ui.message(event.text)
            elif isinstance(event, ReasoningDelta):
                self._reasoning.append(event.text)
                await self.ui.thought(event.text)
            elif isinstance(event, ToolCallDelta):
                calls.add(event)
            elif isinstance(event, Usage):
                usage = event
            elif isinstance(event, Finish):
                finish = event.reason
        if finish is None:
            # A clean end names its reason; a stream that just stops lost its connection,
            # and a tool call in it may be cut in half.
            raise EndpointError(
                "the endpoint's reply ended without a finish reason (the connection was "
                "probably lost); no tool call from it was run"
            )
        tool_calls = calls.calls()
        stop = stop_reason_for(finish, bool(tool_calls))
        if stop is not None:
            tool_calls = []  # a reply cut short may hold half a call: never run it
        self._keep_streamed(tool_calls)
        self._log_round(number, finish, tool_calls, usage, started, len(messages))
        if usage is not None:
            self.result.input_tokens += usage.input_tokens
            self.result.output_tokens += usage.output_tokens
            used = usage.input_tokens + usage.output_tokens
            with contextlib.suppress(Exception):  # optional for the client; never fatal
                await self.ui.usage(used, self.config.context_window)
        if stop is not None:
            return stop
        for call in tool_calls:
            outcome = await self.tools.dispatch(call)
            self.session.messages.append(tool_message(call.id, outcome))
        return None

    def _keep_streamed(self, calls: list[ToolCall]) -> None:
        message = assistant_message("".join(self._text), "".join(self._reasoning), calls)
        self._text, self._reasoning = [], []
        if message is not None:
            self.session.messages.append(message)

    async def _settle_cancelled(self) -> None:
        """Keep what was streamed; answer every tool call that never ran, so the history
        stays a valid conversation for the next prompt."""
        self._keep_streamed([])
        for call_id in self._answer_unanswered("cancelled by the user before this call finished"):
            with contextlib.suppress(Exception):
                await self.ui.tool_update(call_id, status="failed")
        log.info("cancelled", extra={"session_id": self.session.id})

    def _answer_unanswered(self, note: str) -> list[str]:
        missing = unanswered_calls(self.session.messages)
        for call_id in missing:
            outcome = ToolOutcome(False, error_text(note), [text_content(note)])
            self.session.messages.append(tool_message(call_id, outcome))
        return missing

    async def _fail(self, text: str, kind: str) -> None:
        self._keep_streamed([])
        log.warning("turn error", extra={"session_id": self.session.id, "kind": kind, "err": text})
        shown = f"\n\n⚠ {text}" if self.session.messages[-1].get("role") == "assistant" else text
        # Shown and kept for replay, but never sent to the model (_local).
        self.session.messages.append({"role": "assistant", "content": shown, "_local": True})
        await self._say(shown)
        self.result.stop_reason = "end_turn"

    async def _say(self, text: str) -> None:
        with contextlib.suppress(Exception):
            await self.ui.message(text)

    def _log_round(
        self,
        number: int,
        finish: str | None,
        calls: list[ToolCall],
        usage: Usage | None,
        started: float,
        sent: int,
    ) -> None:
        log.info(
            "round",
            extra={
                "session_id": self.session.id,
                "round": number,
                "endpoint": self.config.name,
                "model": self.session.model,
                "mode": self.session.mode,
                "finish": finish or "none",
                "tool_calls": ",".join(c.name for c in calls) or "-",
                "messages": sent,
                "input_tokens": usage.input_tokens if usage else None,
                "output_tokens": usage.output_tokens if usage else None,
                "ms": int((time.monotonic() - started) * 1000),
            },
        )
