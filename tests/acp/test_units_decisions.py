"""helexa-acp's pure decisions: permissions per mode, tool arguments and titles, context
trimming, stop reasons, the model picker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helexa.acp.context import ELIDED, fit_to_window, request_messages, wire_messages
from helexa.acp.loop import assistant_message, stop_reason_for, unanswered_calls
from helexa.acp.options import model_choices
from helexa.acp.policy import ALLOW_ALWAYS, ALLOW_ONCE, Verdict, decide, remembered_after
from helexa.acp.toolrun import apply_edit
from helexa.acp.tools import (
    ReadFileArgs,
    ToolArgError,
    describe,
    openai_tools,
    parse_args,
    resolve_path,
)
from helexa.acp.workspace import ToolError, keep_tail
from helexa.core.stream import ToolCall

CWD = Path("/proj")


@pytest.mark.parametrize(
    ("mode", "tool_class", "target", "always", "verdict"),
    [
        ("default", "read", None, set(), Verdict.ALLOW),
        ("default", "write", CWD / "a", set(), Verdict.ASK),
        ("default", "command", None, set(), Verdict.ASK),
        ("default", "write", CWD / "a", {"edit"}, Verdict.ALLOW),
        ("default", "command", None, {"edit"}, Verdict.ASK),
        ("bypass", "command", None, set(), Verdict.ALLOW),
        ("plan", "command", None, {"execute"}, Verdict.DENY),
        ("plan", "write", CWD / "a.txt", set(), Verdict.DENY),
        ("plan", "write", CWD / ".helexa" / "plans" / "p.md", set(), Verdict.ALLOW),
        ("plan", "write", CWD / ".helexa" / "plans" / ".." / "x.md", set(), Verdict.DENY),
        ("plan", "read", None, set(), Verdict.ALLOW),
    ],
)
def test_decide(
    mode: str, tool_class: str, target: Path | None, always: set[str], verdict: Verdict
) -> None:
    assert decide(mode, tool_class, target, CWD, always).verdict is verdict  # type: ignore[arg-type]


def test_allow_always_remembers_the_kind() -> None:
    assert remembered_after(ALLOW_ALWAYS, "write", set()) == {"edit"}
    assert remembered_after(ALLOW_ALWAYS, "command", {"edit"}) == {"edit", "execute"}
    assert remembered_after(ALLOW_ONCE, "command", set()) == set()


def test_tool_schemas_and_argument_errors() -> None:
    names = [t["function"]["name"] for t in openai_tools()]
    assert names == ["read_file", "list_dir", "write_file", "edit_file", "bash", "grep"]
    args = parse_args("read_file", '{"path": "a.py", "line": "3"}')
    assert isinstance(args, ReadFileArgs) and args.line == 3
    for name, arguments, said in [
        ("nope", "{}", "unknown tool"),
        ("read_file", "{not json", "not valid JSON"),
        ("edit_file", '{"path": "a"}', "old"),
        ("read_file", "[1]", "JSON object"),
    ]:
        with pytest.raises(ToolArgError, match=said):
            parse_args(name, arguments)


def test_paths_and_titles() -> None:
    assert resolve_path(CWD, "src/../a.py") == Path("/proj/a.py")
    assert resolve_path(CWD, "/etc/x") == Path("/etc/x")
    assert resolve_path(CWD, "~/f") == Path.home() / "f"
    view = describe("read_file", parse_args("read_file", '{"path": "a.py", "line": 4}'), CWD)
    assert (view.title, view.kind, view.locations) == (
        "Read a.py (from line 4)",
        "read",
        [("/proj/a.py", 4)],
    )
    view = describe("edit_file", parse_args("edit_file", '{"path":"b","old":"x","new":"y"}'), CWD)
    assert (view.kind, view.target) == ("edit", Path("/proj/b"))
    assert describe("bash", parse_args("bash", '{"command": "ls"}'), CWD).kind == "execute"
    assert describe("grep", parse_args("grep", '{"pattern": "x"}'), CWD).kind == "search"


def test_edit_needs_exactly_one_occurrence() -> None:
    assert apply_edit("a b c", "b", "B", CWD) == "a B c"
    with pytest.raises(ToolError, match="not found"):
        apply_edit("a b c", "z", "Z", CWD)
    with pytest.raises(ToolError, match="2 times"):
        apply_edit("b b", "b", "B", CWD)


def test_output_tails() -> None:
    buffer = bytearray()
    assert keep_tail(buffer, b"abcdef", 4) and buffer == b"cdef"


def _tool_turn(i: int, size: int) -> list[dict[str, object]]:
    call = {"id": f"c{i}", "type": "function", "function": {"name": "grep", "arguments": "{}"}}
    return [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": "x" * size},
    ]


def test_trimming_elides_the_oldest_tool_output_first_then_drops_old_turns() -> None:
    history = [{"role": "user", "content": "old question"}]
    for i in range(3):
        history += _tool_turn(i, 4000)
    history.append({"role": "user", "content": "new question"})
    history += _tool_turn(9, 400)
    fitted = fit_to_window(history, 1500)
    tools = [m for m in fitted if m["role"] == "tool"]
    assert tools[0]["content"] == ELIDED and tools[-1]["content"] == "x" * 400
    assert history[2]["content"] == "x" * 4000  # pure: the stored history is untouched
    tight = fit_to_window(history, 120)
    assert tight[0] == {"role": "user", "content": "new question"}
    assert tight[-1]["role"] == "tool"


def test_wire_messages_drop_our_keys_and_local_messages() -> None:
    history = [
        {"role": "user", "content": "hi", "_prompt": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "yo", "_reasoning": "hmm"},
        {"role": "assistant", "content": "⚠ down", "_local": True},
        {"role": "assistant", "content": None},
    ]
    assert wire_messages(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    messages, max_tokens = request_messages(history, "/p", "plan", openai_tools(), 32768, 8192)
    assert messages[0]["role"] == "system" and ".helexa/plans" in messages[0]["content"]
    assert max_tokens == 8192
    _, squeezed = request_messages(history, "/p", "default", openai_tools(), 2048, 8192)
    assert 256 <= squeezed < 2048


def test_stop_reasons_and_unanswered_calls() -> None:
    assert stop_reason_for("stop", False) == "end_turn"
    assert stop_reason_for("tool_calls", True) is None
    assert stop_reason_for("stop", True) is None  # some servers say stop with calls
    assert stop_reason_for("length", True) == "max_tokens"
    assert stop_reason_for("refusal", False) == "refusal"
    assert assistant_message("", "", []) is None
    message = assistant_message("", "r", [ToolCall("a", "bash", "{}"), ToolCall("b", "grep", "{}")])
    assert message is not None and message["content"] is None and message["_reasoning"] == "r"
    history = [message, {"role": "tool", "tool_call_id": "a", "content": json.dumps({})}]
    assert unanswered_calls(history) == ["b"]


def test_model_choices_keep_the_current_value_listed() -> None:
    assert model_choices(["a", "b"], "a", "a") == ["a", "b"]
    assert model_choices(["a", "b"], "cfg", "b") == ["a", "b", "cfg"]
    assert model_choices([], "cfg", "cur") == ["cur", "cfg"]
