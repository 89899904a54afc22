"""helexa-acp's agent loop in process, with a fake endpoint and a recording UI: rounds,
saving after every round, cancellation, endpoint errors, the local tool fallbacks, the
store and the replay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from helexa.acp.config import EndpointConfig
from helexa.acp.display import Content
from helexa.acp.endpoint import EndpointError
from helexa.acp.history import replay, user_message
from helexa.acp.loop import Turn
from helexa.acp.store import SessionStore, StoredSession, new_session_id
from helexa.acp.toolrun import ToolRunner
from helexa.acp.tools import CallView
from helexa.acp.workspace import ClientCaps, Workspace
from helexa.core.stream import Finish, ReasoningDelta, StreamEvent, TextDelta, ToolCallDelta


class FakeEndpoint:
    """Answers each round from a script; ``None`` in the script blocks until cancelled."""

    def __init__(self, rounds: list[list[StreamEvent] | Exception | None]) -> None:
        self.config = EndpointConfig()
        self.rounds = rounds
        self.seen: list[list[dict[str, Any]]] = []
        self.closed = asyncio.Event()

    async def stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], model: str, mt: int
    ) -> AsyncIterator[StreamEvent]:
        self.seen.append(messages)
        script = self.rounds[len(self.seen) - 1]
        if isinstance(script, Exception):
            raise script
        if script is None:
            yield TextDelta("partial ")
            try:
                await asyncio.sleep(3600)
            finally:
                self.closed.set()  # the stream is closed as cancellation unwinds
        for event in script or []:
            yield event

    async def list_models(self, timeout_s: float) -> list[str]:
        return []

    async def aclose(self) -> None:
        return None


class RecordingUi:
    def __init__(self, answer: str | None = "allow_once") -> None:
        self.answer = answer
        self.events: list[tuple[str, Any]] = []

    async def message(self, text: str) -> None:
        self.events.append(("message", text))

    async def thought(self, text: str) -> None:
        self.events.append(("thought", text))

    async def tool_start(self, call_id: str, view: CallView, raw_input: Any) -> None:
        self.events.append(("tool_start", (call_id, view.title, view.kind)))

    async def tool_update(
        self,
        call_id: str,
        *,
        status: str | None = None,
        content: list[Content] | None = None,
        raw_output: Any = None,
    ) -> None:
        self.events.append(("tool_update", (call_id, status, content)))

    async def ask_permission(self, call_id: str, view: CallView, content: list[Content]) -> Any:
        self.events.append(("ask", (call_id, content)))
        return self.answer

    async def usage(self, used: int, size: int) -> None:
        self.events.append(("usage", used))

    def text(self) -> str:
        return "".join(v for k, v in self.events if k == "message")


def call(index: int, name: str, **arguments: Any) -> ToolCallDelta:
    return ToolCallDelta(index, f"call{index}-{name}", name, json.dumps(arguments))


def make_turn(
    tmp_path: Path, endpoint: FakeEndpoint, ui: RecordingUi, mode: str = "default"
) -> tuple[Turn, StoredSession, SessionStore, list[int]]:
    store = SessionStore(tmp_path / "sessions")
    session = StoredSession(id=new_session_id(), cwd=str(tmp_path), model="m", mode=mode)
    saves: list[int] = []

    async def save() -> None:
        store.save(session)
        saves.append(len(session.messages))

    workspace = Workspace(None, session.id, ClientCaps(), timeout_s=5, output_limit=2048)
    tools = ToolRunner(workspace, ui, session, output_limit=4096)
    turn = Turn(
        session=session,
        endpoint=endpoint,
        endpoint_config=endpoint.config,
        tools=tools,
        ui=ui,
        save=save,
        max_rounds=4,
    )
    return turn, session, store, saves


def prompt(text: str) -> dict[str, Any]:
    return user_message([{"type": "text", "text": text}])


def test_rounds_run_tools_locally_and_save_after_each(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha\nbeta\n")
    endpoint = FakeEndpoint(
        [
            [
                ReasoningDelta("look"),
                TextDelta("Reading."),
                call(0, "read_file", path="a.txt"),
                Finish("tool_calls"),
            ],
            [
                call(0, "edit_file", path="a.txt", old="beta", new="BETA"),
                call(1, "bash", command="echo hi-$((1+1)); exit 3"),
                Finish("tool_calls"),
            ],
            [TextDelta("Done."), Finish("stop")],
        ]
    )
    ui = RecordingUi()
    turn, session, store, saves = make_turn(tmp_path, endpoint, ui)
    result = asyncio.run(turn.run(prompt("fix a.txt")))
    assert result.stop_reason == "end_turn"
    assert (tmp_path / "a.txt").read_text() == "alpha\nBETA\n"
    assert saves[:3] == [1, 3, 6]  # the prompt, then after round 1 and round 2
    roles = [m["role"] for m in session.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "tool", "assistant"]
    assert "alpha" in session.messages[2]["content"]
    bash_result = session.messages[5]
    assert "hi-2" in bash_result["content"] and "[exit code 3]" in bash_result["content"]
    assert bash_result["_status"] == "failed"
    asks = [e for e in ui.events if e[0] == "ask"]
    assert len(asks) == 2 and asks[0][1][1][0]["type"] == "diff"
    stored = store.load(session.id)
    assert stored is not None and stored.messages == session.messages
    second = endpoint.seen[1]
    assert second[0]["role"] == "system" and all(not k.startswith("_") for m in second for k in m)
    kinds = [u.session_update for u in replay(session.messages, session.cwd)]
    assert kinds[:4] == [
        "user_message_chunk",
        "agent_thought_chunk",
        "agent_message_chunk",
        "tool_call",
    ]
    assert kinds.count("tool_call") == kinds.count("tool_call_update") == 3


def test_denied_and_refused_calls_go_back_to_the_model(tmp_path: Path) -> None:
    endpoint = FakeEndpoint(
        [
            [call(0, "write_file", path="x.txt", content="x"), Finish("tool_calls")],
            [TextDelta("ok"), Finish("stop")],
        ]
    )
    turn, session, _, _ = make_turn(tmp_path, endpoint, RecordingUi(answer="reject_once"))
    assert asyncio.run(turn.run(prompt("write"))).stop_reason == "end_turn"
    assert not (tmp_path / "x.txt").exists()
    assert "denied" in json.loads(session.messages[2]["content"])["error"]
    plan = FakeEndpoint(
        [
            [
                call(0, "bash", command="touch nope"),
                call(1, "write_file", path=".helexa/plans/p.md", content="P"),
                Finish("tool_calls"),
            ],
            [Finish("stop")],
        ]
    )
    ui = RecordingUi(answer=None)
    turn, session, _, _ = make_turn(tmp_path, plan, ui, mode="plan")
    asyncio.run(turn.run(prompt("plan it")))
    assert "plan mode" in session.messages[2]["content"]
    assert (tmp_path / ".helexa" / "plans" / "p.md").read_text() == "P"
    assert not (tmp_path / "nope").exists() and not [e for e in ui.events if e[0] == "ask"]


def test_cancel_closes_the_stream_and_leaves_a_consistent_history(tmp_path: Path) -> None:
    endpoint = FakeEndpoint([None])
    ui = RecordingUi()
    turn, session, store, _ = make_turn(tmp_path, endpoint, ui)

    async def main() -> str:
        task = asyncio.create_task(turn.run(prompt("long")))
        while "partial" not in ui.text():
            await asyncio.sleep(0.01)
        task.cancel()
        result = await asyncio.wait_for(task, 5)
        assert endpoint.closed.is_set()
        return result.stop_reason

    assert asyncio.run(main()) == "cancelled"
    stored = store.load(session.id)
    assert stored is not None
    assert [m["role"] for m in stored.messages] == ["user", "assistant"]
    assert stored.messages[1]["content"] == "partial "


def test_a_cancelled_command_answers_its_call_and_kills_the_process(tmp_path: Path) -> None:
    endpoint = FakeEndpoint([[call(0, "bash", command="sleep 30"), Finish("tool_calls")]])
    ui = RecordingUi()
    turn, session, _, _ = make_turn(tmp_path, endpoint, ui, mode="bypass")

    async def main() -> str:
        task = asyncio.create_task(turn.run(prompt("sleep")))
        while not any(e[0] == "tool_update" and e[1][1] == "in_progress" for e in ui.events):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        task.cancel()
        return (await asyncio.wait_for(task, 5)).stop_reason

    assert asyncio.run(main()) == "cancelled"
    assert session.messages[-1]["role"] == "tool" and "cancelled" in session.messages[-1]["content"]


def test_endpoint_errors_are_shown_and_not_sent_back(tmp_path: Path) -> None:
    endpoint = FakeEndpoint([EndpointError("Cannot reach endpoint 'x'"), [Finish("stop")]])
    ui = RecordingUi()
    turn, session, _, _ = make_turn(tmp_path, endpoint, ui)
    assert asyncio.run(turn.run(prompt("hi"))).stop_reason == "end_turn"
    assert "Cannot reach" in ui.text()
    assert session.messages[-1]["_local"] is True
    turn2, *_ = make_turn(tmp_path, endpoint, ui)
    turn2.session.messages = list(session.messages)
    asyncio.run(turn2.run(prompt("again")))
    assert all("Cannot reach" not in json.dumps(m) for m in endpoint.seen[1])


def test_the_round_limit_stops_the_turn(tmp_path: Path) -> None:
    endpoint = FakeEndpoint(
        [[call(0, "list_dir", path="."), Finish("tool_calls")] for _ in range(4)]
    )
    turn, _, _, _ = make_turn(tmp_path, endpoint, RecordingUi())
    assert asyncio.run(turn.run(prompt("loop"))).stop_reason == "max_turn_requests"


def test_store_is_atomic_and_lists_newest_first(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    a = StoredSession(id=new_session_id(), cwd="/p", model="m", updated_at="2024-01-01T00:00:00Z")
    b = StoredSession(id=new_session_id(), cwd="/q", model="m", updated_at="2025-01-01T00:00:00Z")
    store.save(a)
    store.save(b)
    (tmp_path / "broken.json").write_text("{")
    assert [s.id for s in store.all()] == [b.id, a.id]
    assert list(tmp_path.glob("*.tmp")) == []
    assert store.load("../etc/passwd") is None
    with pytest.raises(ValueError):
        store.path_for("a/b")
