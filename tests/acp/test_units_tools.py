"""helexa-acp's tool calls in process: plan mode cannot be escaped through symlinks, a bad
call becomes an error result (never the end of the turn or an unloadable session), edits
keep line endings and apply to the file as it is after the permission prompt, stored diffs
are capped, and a stream cut short is an error."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from acp import start_tool_call

from helexa.acp.anthropic_messages import to_anthropic
from helexa.acp.context import wire_messages
from helexa.acp.display import Content, diff_content, for_storage, text_content
from helexa.acp.history import replay
from helexa.acp.openai_chat import request_body
from helexa.acp.policy import Verdict, decide
from helexa.acp.tools import CallView
from helexa.core.stream import Finish, TextDelta, ToolCallDelta
from tests.acp.test_units_turn import FakeEndpoint, RecordingUi, call, make_turn, prompt


def plan_verdict(cwd: Path, target: Path) -> Verdict:
    return decide("plan", "write", target, cwd, set()).verdict


def test_plan_mode_cannot_write_through_a_symlinked_plans_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for name, link in [("up", ".."), ("root", "/"), ("out", str(outside))]:
        cwd = tmp_path / name
        (cwd / ".helexa").mkdir(parents=True)
        (cwd / ".helexa" / "plans").symlink_to(link)
        assert plan_verdict(cwd, cwd / ".helexa" / "plans" / "x.md") is Verdict.DENY
    cwd = tmp_path / "dotlink"
    cwd.mkdir()
    (cwd / ".helexa").symlink_to(outside)
    (outside / "plans").mkdir()
    assert plan_verdict(cwd, cwd / ".helexa" / "plans" / "x.md") is Verdict.DENY
    cwd = tmp_path / "real"
    plans = cwd / ".helexa" / "plans"
    plans.mkdir(parents=True)
    (plans / "escape.md").symlink_to(outside / "e.md")
    assert plan_verdict(cwd, plans / "escape.md") is Verdict.DENY
    assert plan_verdict(cwd, plans / "ok.md") is Verdict.ALLOW
    assert plan_verdict(tmp_path / "fresh", tmp_path / "fresh" / ".helexa/plans/p.md") is (
        Verdict.ALLOW  # not created yet: the first write makes it
    )


class SerializingUi(RecordingUi):
    """Serializes each tool start as the SDK would send it."""

    async def tool_start(self, call_id: str, view: CallView, raw_input: Any) -> None:
        start_tool_call(call_id, view.title, raw_input=raw_input).model_dump_json()
        await super().tool_start(call_id, view, raw_input)


def test_bad_calls_become_error_results_and_the_session_still_loads(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    too_deep_to_send = '{"path": ' + "[" * 500 + "]" * 500 + "}"  # parses; cannot serialize
    endpoint = FakeEndpoint(
        [
            [
                call(0, "read_file", path="a\0b"),
                call(1, "bash", command="echo \0"),
                call(2, "grep", pattern="a{99999999999}"),
                ToolCallDelta(3, "deep", "read_file", deep),
                call(4, "write_file", path="n\0ul", content="x"),
                ToolCallDelta(5, "deep2", "read_file", too_deep_to_send),
                Finish("tool_calls"),
            ],
            [TextDelta("recovered"), Finish("stop")],
        ]
    )
    ui = SerializingUi()
    turn, session, store, _ = make_turn(tmp_path, endpoint, ui, mode="bypass")
    assert asyncio.run(turn.run(prompt("break things"))).stop_reason == "end_turn"
    results = [m for m in session.messages if m["role"] == "tool"]
    assert [m["_status"] for m in results] == ["failed"] * 6
    errors = [json.loads(m["content"])["error"] for m in results]
    assert "null byte" in errors[0] and "null byte" in errors[1]
    assert "bad regular expression" in errors[2] and "nested too deeply" in errors[3]
    assert "recovered" in ui.text()
    stored = store.load(session.id)
    assert stored is not None
    updates = replay(stored.messages, stored.cwd)  # the deep call must not break a load
    assert sum(u.session_update == "tool_call" for u in updates) == 6
    to_anthropic(wire_messages(stored.messages))


def test_replay_tolerates_any_stored_arguments() -> None:
    calls = [
        {"id": "a", "function": {"name": "read_file", "arguments": "[" * 100_000}},
        {"id": "b", "function": {"name": "grep", "arguments": {"not": "a string"}}},
        {"id": "c", "function": {"name": None, "arguments": None}},
    ]
    updates = replay([{"role": "assistant", "content": None, "tool_calls": calls}], "/p")
    assert [u.tool_call_id for u in updates] == ["a", "b", "c"]


def test_edits_and_writes_keep_crlf_line_endings(tmp_path: Path) -> None:
    (tmp_path / "dos.txt").write_bytes(b"one\r\ntwo\r\n")
    endpoint = FakeEndpoint(
        [
            [
                call(0, "edit_file", path="dos.txt", old="two\r\n", new="2\r\nthree\r\n"),
                call(1, "write_file", path="new.txt", content="a\r\nb\r\n"),
                Finish("tool_calls"),
            ],
            [Finish("stop")],
        ]
    )
    turn, *_ = make_turn(tmp_path, endpoint, RecordingUi(), mode="bypass")
    asyncio.run(turn.run(prompt("edit")))
    assert (tmp_path / "dos.txt").read_bytes() == b"one\r\n2\r\nthree\r\n"
    assert (tmp_path / "new.txt").read_bytes() == b"a\r\nb\r\n"


class EditingUi(RecordingUi):
    """The user changes the file while the permission prompt is up."""

    def __init__(self, path: Path, text: str) -> None:
        super().__init__()
        self.path, self.new_text = path, text

    async def ask_permission(self, call_id: str, view: CallView, content: list[Content]) -> Any:
        self.path.write_text(self.new_text)
        return await super().ask_permission(call_id, view, content)


@pytest.mark.parametrize(
    ("meanwhile", "expected", "status"),
    [
        ("top\nalpha\nbeta\n", "top\nalpha\nBETA\n", "completed"),  # kept the user's line
        ("alpha\ngamma\n", "alpha\ngamma\n", "failed"),  # `old` is gone
        ("beta\nalpha\nbeta\n", "beta\nalpha\nbeta\n", "failed"),  # now twice
    ],
)
def test_an_edit_applies_to_the_file_as_it_is_after_permission(
    tmp_path: Path, meanwhile: str, expected: str, status: str
) -> None:
    path = tmp_path / "a.txt"
    path.write_text("alpha\nbeta\n")
    endpoint = FakeEndpoint(
        [
            [call(0, "edit_file", path="a.txt", old="beta", new="BETA"), Finish("tool_calls")],
            [Finish("stop")],
        ]
    )
    turn, session, _, _ = make_turn(tmp_path, endpoint, EditingUi(path, meanwhile))
    asyncio.run(turn.run(prompt("edit")))
    assert path.read_text() == expected
    result = session.messages[2]
    assert result["_status"] == status
    if status == "failed":
        assert "changed while waiting for permission" in result["content"]
    else:
        assert result["_content"][0]["oldText"] == meanwhile


def test_stored_diffs_are_capped_but_shown_in_full(tmp_path: Path) -> None:
    small = diff_content("/p/a", "x", "y")
    big = diff_content("/p/b", "x" * 10, "y" * 100)
    stored = for_storage([small, big, text_content("t")], limit=50)
    assert stored[0] == small and stored[2] == text_content("t")
    assert stored[1]["type"] == "content" and "not kept" in stored[1]["content"]["text"]
    (tmp_path / "big.txt").write_text("z" * 100_000 + "\nend\n")
    endpoint = FakeEndpoint(
        [
            [call(0, "edit_file", path="big.txt", old="end", new="END"), Finish("tool_calls")],
            [Finish("stop")],
        ]
    )
    ui = RecordingUi()
    turn, session, store, _ = make_turn(tmp_path, endpoint, ui, mode="bypass")
    asyncio.run(turn.run(prompt("edit")))
    shown = [e[1][2] for e in ui.events if e[0] == "tool_update" and e[1][2]]
    assert shown[-1][0]["type"] == "diff" and shown[-1][0]["newText"].endswith("END\n")
    assert session.messages[2]["_content"][0]["type"] == "content"
    assert store.path_for(session.id).stat().st_size < 20_000


def test_failed_tool_results_carry_is_error_on_the_anthropic_wire() -> None:
    history = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "ok", "function": {"name": "grep", "arguments": "{}"}},
                {"id": "bad", "function": {"name": "grep", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "ok", "content": "fine", "_status": "completed"},
        {"role": "tool", "tool_call_id": "bad", "content": "{}", "_status": "failed"},
    ]
    wire = wire_messages(history)
    _, messages = to_anthropic(wire)
    ok, bad = messages[2]["content"]
    assert "is_error" not in ok and bad["is_error"] is True
    sent = request_body(wire, [], "m", 10)["messages"]
    assert all("is_error" not in m for m in sent)  # the OpenAI wire has no such field


def test_a_stream_without_a_finish_reason_is_an_error(tmp_path: Path) -> None:
    endpoint = FakeEndpoint([[TextDelta("half an answer"), call(0, "bash", command="touch x")]])
    ui = RecordingUi()
    turn, session, _, _ = make_turn(tmp_path, endpoint, ui, mode="bypass")
    asyncio.run(turn.run(prompt("go")))
    assert "without a finish reason" in ui.text()
    assert not (tmp_path / "x").exists()  # a call from a cut stream is never run
    assert session.messages[1] == {"role": "assistant", "content": "half an answer"}
    assert session.messages[-1]["_local"] is True
