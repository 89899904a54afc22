"""helexa-acp end to end: the real console script spawned over stdio by an ACP client (the
SDK's client side, as an editor), a real cortex behind it, and the scripted stand-in neuron
calling the agent's tools on the cues in each prompt (`ACP:write`, `ACP:edit`, ...: see
tests/support/scripted_neuron.py). One chat goes to a real neuron with a tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from acp import RequestError

from tests.acp.conftest import TINY_ACP, Upstream
from tests.acp.harness import (
    PERMISSION_IDS,
    Running,
    TestClient,
    agent_env,
    dump,
    running_agent,
    sessions_dir,
    step,
)
from tests.support.procs import free_port

TOOLS = {
    "read_file": ({"path", "line", "limit"}, {"path"}),
    "list_dir": ({"path"}, {"path"}),
    "write_file": ({"path", "content"}, {"path", "content"}),
    "edit_file": ({"path", "old", "new"}, {"path", "old", "new"}),
    "bash": ({"command", "cwd"}, {"command"}),
    "grep": ({"pattern", "path"}, {"pattern"}),
}
DENIAL_WORDS = ("denied", "rejected", "declined", "refused", "not allowed", "not permitted")


def run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def completed(calls: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in calls.values() if c.get("status") == "completed"]


def bodies_with(upstream: Upstream, marker: str) -> list[dict[str, Any]]:
    return [b for b in upstream.received() if marker in json.dumps(b["messages"])]


async def wait_received(upstream: Upstream, marker: str, timeout: float = 20) -> None:
    """Until a request carrying ``marker`` has reached the (scripted) model."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(bodies_with, upstream, marker):
        assert time.monotonic() < deadline, f"{marker} never reached the model"
        await asyncio.sleep(0.1)


def disconnects(upstream: Upstream) -> int:
    """Requests cortex saw their client leave before the answer was done."""
    return upstream.cortex.log().count("error=client_disconnected")


async def session(agent: Running, cwd: Path) -> str:
    return (await agent.new_session(cwd)).session_id


# -- initialize, session/new ----------------------------------------------------------------


def test_initialize_and_new_session_advertise_what_the_contract_says(
    env: dict[str, str], project: Path, acp_upstream: Upstream
) -> None:
    async def main() -> None:
        async with running_agent(env, project) as agent:
            caps = agent.init["agentCapabilities"]
            assert caps.get("loadSession") is True, agent.init
            assert "list" in (caps.get("sessionCapabilities") or {}), agent.init
            new = (await agent.new_session(project)).model_dump(by_alias=True, exclude_none=True)
            assert new["sessionId"]
            assert "modes" in new, f"session/new carries no modes: {new}"
            assert new["modes"]["currentModeId"] == "default"
            modes = {m["id"] for m in new["modes"]["availableModes"]}
            assert modes == {"default", "bypass", "plan"}
            [model] = [o for o in new.get("configOptions", []) if o["id"] == "model"]
            served = httpx.get(f"{acp_upstream.base}/v1/models", timeout=10).json()["data"]
            values = {option["value"] for option in model["options"]}
            assert {m["id"] for m in served} <= values, (values, served)
            assert model["currentValue"] == "scripted/qwen"  # HELEXA_ACP_MODEL

    run(main())


def test_the_model_gets_the_six_tools_with_their_exact_arguments(
    env: dict[str, str], project: Path, acp_upstream: Upstream
) -> None:
    async def main() -> None:
        async with running_agent(env, project) as agent:
            sid = await session(agent, project)
            assert await agent.prompt(sid, "hello TOOLSET-1") == "end_turn", dump(agent)
            assert "ok: hello TOOLSET-1" in agent.client.text(sid)

    run(main())
    [body] = bodies_with(acp_upstream, "TOOLSET-1")
    assert body["stream"] is True
    tools = {t["function"]["name"]: t["function"] for t in body["tools"]}
    assert set(tools) == set(TOOLS)
    for name, (properties, required) in TOOLS.items():
        schema = tools[name]["parameters"]
        assert set(schema["properties"]) == properties, (name, schema)
        assert set(schema.get("required", [])) == required, (name, schema)
    assert all(t["type"] == "function" for t in body["tools"])


# -- tools and permissions -------------------------------------------------------------------


def test_a_write_asks_permission_then_writes_through_the_client(
    env: dict[str, str], project: Path
) -> None:
    target = project / "notes" / "hello.txt"
    client = TestClient(answer="allow_once")

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            stop = await agent.prompt(sid, f"ACP:write {target} hello from acp")
            assert stop == "end_turn", dump(agent)
            assert target.read_text() == "hello from acp"
            [(tool_call, options)] = client.permissions
            assert set(options) >= PERMISSION_IDS, options
            [call] = agent.client.tool_calls(sid).values()
            assert call["toolCallId"] == tool_call["toolCallId"]
            assert call["kinds"][0] == "tool_call" and call["status"] == "completed", call
            writes = client.requests("fs/write_text_file")
            assert [(w["path"], w["content"]) for w in writes] == [(str(target), "hello from acp")]
            methods = [m["method"] for m in client.messages]
            asked = methods.index("session/request_permission")
            assert asked < methods.index("fs/write_text_file")
            assert "done: " in client.text(sid)

    run(main())
    assert "write_file" in Path(env["HELEXA_ACP_LOG_FILE"]).read_text()


def test_an_edit_streams_a_diff_and_changes_the_file(env: dict[str, str], project: Path) -> None:
    target = project / "code.py"
    target.write_text("alpha = 1\nbeta = 2\ngamma = 3\n")
    client = TestClient(answer="allow_once")

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            assert await agent.prompt(sid, f"ACP:edit {target} beta BETA") == "end_turn"
            assert target.read_text() == "alpha = 1\nBETA = 2\ngamma = 3\n", dump(agent)
            assert len(client.permissions) == 1
            [call] = client.tool_calls(sid).values()
            assert call["status"] == "completed", call
            diffs = [
                c
                for u in client.updates(sid, "tool_call_update")
                for c in u.get("content") or []
                if c.get("type") == "diff"
            ]
            assert diffs, f"no tool_call_update with diff content: {call}"
            diff = diffs[-1]
            assert diff["path"] == str(target)
            assert "beta = 2" in diff["oldText"] and "BETA = 2" in diff["newText"], diff
            assert any(r["path"] == str(target) for r in client.requests("fs/read_text_file"))
            assert client.requests("fs/write_text_file")

    run(main())


def test_bash_runs_in_the_clients_terminal(env: dict[str, str], project: Path) -> None:
    client = TestClient(answer="allow_once")

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            stop = await agent.prompt(sid, "ACP:bash echo hello-from-bash-$((40 + 2))")
            assert stop == "end_turn", dump(agent)
            assert len(client.permissions) == 1
            [command] = client.commands
            assert "echo hello-from-bash" in " ".join([command["command"], *command["args"]])
            assert "hello-from-bash-42" in client.text(sid), dump(agent)
            [call] = client.tool_calls(sid).values()
            assert call["status"] == "completed"

    run(main())


def test_read_list_and_grep_report_back_to_the_model(env: dict[str, str], project: Path) -> None:
    (project / "src").mkdir()
    (project / "src" / "a.txt").write_text("one\nneedle-xyz here\nthree\n")
    (project / "src" / "b.txt").write_text("nothing\n")
    (project / "src" / "round0").mkdir()
    (project / "src" / "round0" / "listed-file.txt").write_text("")
    client = TestClient(answer="reject_once")  # reads never ask

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            assert await agent.prompt(sid, f"ACP:read {project / 'src' / 'a.txt'}") == "end_turn"
            assert "needle-xyz" in client.text(sid), dump(agent)
            before = len(client.text(sid))
            await agent.prompt(sid, f"ACP:grep needle-xyz {project / 'src'}")
            assert "a.txt" in client.text(sid)[before:], dump(agent)
            before = len(client.text(sid))
            await agent.prompt(sid, f"ACP:rounds 1 0 {project / 'src'}")  # list_dir src/round0
            assert "listed-file.txt" in client.text(sid)[before:], dump(agent)
            assert client.permissions == []
            statuses = {c.get("status") for c in client.tool_calls(sid).values()}
            assert statuses == {"completed"}, statuses

    run(main())


@pytest.mark.parametrize("answer", ["reject_once", "cancelled"])
def test_a_denied_write_is_not_written_and_the_model_is_told(
    env: dict[str, str], project: Path, answer: str
) -> None:
    """Rejected, or the question dismissed (outcome "cancelled")."""
    target = project / "denied.txt"
    client = TestClient(answer=answer)

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            assert await agent.prompt(sid, f"ACP:write {target} nope") == "end_turn"
            assert len(client.permissions) == 1
            assert not target.exists()
            assert client.requests("fs/write_text_file") == []
            said = client.text(sid).lower()
            assert "done: " in said and any(w in said for w in DENIAL_WORDS), said
            [call] = client.tool_calls(sid).values()
            assert call["status"] in ("failed", "completed"), call

    run(main())


def test_allow_always_asks_once_per_session(env: dict[str, str], project: Path) -> None:
    client = TestClient(answer="allow_always")

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            await agent.prompt(sid, f"ACP:write {project / 'a.txt'} first")
            await agent.prompt(sid, f"ACP:write {project / 'b.txt'} second")
            assert (project / "a.txt").read_text() == "first"
            assert (project / "b.txt").read_text() == "second"
            assert len(client.permissions) == 1, client.permissions

    run(main())


def test_without_client_capabilities_the_agent_does_the_work_itself(
    env: dict[str, str], project: Path
) -> None:
    client = TestClient(answer="allow_once", fs=False, terminal=False)
    target = project / "local.txt"

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            await agent.prompt(sid, f"ACP:write {target} written locally")
            await agent.prompt(sid, "ACP:bash echo local-bash-$((6 * 7))")
            await agent.prompt(sid, f"ACP:read {target}")
            assert target.read_text() == "written locally", dump(agent)
            assert "local-bash-42" in client.text(sid)
            assert client.text(sid).count("written locally") >= 1
            methods = {m["method"] for m in client.messages}
            assert not {m for m in methods if m.startswith(("fs/", "terminal/"))}, methods

    run(main())


# -- modes -----------------------------------------------------------------------------------


def test_plan_mode_refuses_commands_and_writes_outside_the_plans_folder(
    env: dict[str, str], project: Path
) -> None:
    client = TestClient(answer="allow_once")
    plan = project / ".helexa" / "plans" / "plan.md"

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            await step(agent.conn.set_session_mode(session_id=sid, mode_id="plan"))
            assert await agent.prompt(sid, f"ACP:bash touch {project / 'bashed'}") == "end_turn"
            assert await agent.prompt(sid, f"ACP:write {project / 'outside.txt'} x") == "end_turn"
            assert await agent.prompt(sid, f"ACP:write {plan} the plan") == "end_turn"
            assert not (project / "bashed").exists()
            assert client.commands == []
            assert not (project / "outside.txt").exists()
            assert plan.read_text() == "the plan", dump(agent)
            said = client.text(sid).lower()
            assert said.count("done: ") == 3, said

    run(main())


def test_bypass_mode_asks_nothing(env: dict[str, str], project: Path) -> None:
    client = TestClient(answer="reject_once")  # were it asked, nothing would happen

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            await step(agent.conn.set_session_mode(session_id=sid, mode_id="bypass"))
            await agent.prompt(sid, f"ACP:write {project / 'free.txt'} free")
            await agent.prompt(sid, "ACP:bash echo bypassed-$((1 + 1))")
            assert client.permissions == []
            assert (project / "free.txt").read_text() == "free", dump(agent)
            assert "bypassed-2" in client.text(sid)

    run(main())


def test_the_model_option_switches_the_model_cortex_is_asked_for(
    env: dict[str, str], project: Path, acp_upstream: Upstream
) -> None:
    async def main() -> None:
        async with running_agent(env, project) as agent:
            sid = await session(agent, project)
            response = await step(
                agent.conn.set_config_option(config_id="model", session_id=sid, value="helexa/alt")
            )
            options = response.model_dump(by_alias=True)["configOptions"]
            [model] = [o for o in options if o["id"] == "model"]
            assert model["currentValue"] == "helexa/alt"
            assert await agent.prompt(sid, "which model MODELSWITCH-1") == "end_turn"

    run(main())
    access = [
        line
        for line in acp_upstream.cortex.log().splitlines()
        if "path=/v1/chat/completions" in line
    ]
    assert any("model=helexa/alt " in f"{line} " for line in access), access[-3:]


# -- thinking, cancel ------------------------------------------------------------------------


def test_reasoning_streams_as_thought_chunks(env: dict[str, str], project: Path) -> None:
    async def main() -> None:
        async with running_agent(env, project) as agent:
            sid = await session(agent, project)
            assert await agent.prompt(sid, "ACP:think") == "end_turn"
            assert agent.client.text(sid, "agent_thought_chunk") == "Let me think about this."
            assert agent.client.text(sid) == "Thought it through."

    run(main())


def test_an_answer_cut_by_the_token_limit_stops_as_max_tokens(
    env: dict[str, str], project: Path
) -> None:
    async def main() -> None:
        async with running_agent(env, project) as agent:
            sid = await session(agent, project)
            assert await agent.prompt(sid, "ACP:truncate") == "max_tokens", dump(agent)
            assert agent.client.text(sid) == "This answer is cut"

    run(main())


def test_cancel_mid_round_stops_promptly(
    env: dict[str, str], project: Path, acp_upstream: Upstream
) -> None:
    async def main() -> None:
        async with running_agent(env, project) as agent:
            sid = await session(agent, project)
            turn = asyncio.create_task(agent.prompt(sid, "ACP:slow 60 CANCEL-ME-1"))
            await wait_received(acp_upstream, "CANCEL-ME-1")
            gone_before = disconnects(acp_upstream)
            started = time.monotonic()
            await agent.conn.cancel(session_id=sid)
            assert await step(turn, 10) == "cancelled", dump(agent)
            assert time.monotonic() - started < 10
            # The model call itself was abandoned: cortex saw its client leave.
            await agent.client.wait_for(lambda: disconnects(acp_upstream) > gone_before, 10)
            # The session goes on afterwards.
            assert await agent.prompt(sid, "still there AFTER-CANCEL-1") == "end_turn"
            assert "AFTER-CANCEL-1" in agent.client.text(sid)

    run(main())


def test_a_new_prompt_cancels_the_one_in_flight(
    env: dict[str, str], project: Path, acp_upstream: Upstream
) -> None:
    async def main() -> None:
        async with running_agent(env, project) as agent:
            sid = await session(agent, project)
            first = asyncio.create_task(agent.prompt(sid, "ACP:slow 60 FIRST-PROMPT-1"))
            await wait_received(acp_upstream, "FIRST-PROMPT-1")
            started = time.monotonic()
            second = asyncio.create_task(agent.prompt(sid, "then SECOND-PROMPT-1"))
            assert await step(first, 10) == "cancelled", dump(agent)
            assert await step(second, 20) == "end_turn", dump(agent)
            assert time.monotonic() - started < 15
            assert "ok: then SECOND-PROMPT-1" in agent.client.text(sid)

    run(main())


def test_cancel_kills_the_command_in_the_clients_terminal(
    env: dict[str, str], project: Path
) -> None:
    client = TestClient(answer="allow_once")

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            turn = asyncio.create_task(agent.prompt(sid, "ACP:bash sleep 60"))
            await client.wait_for(lambda: client.terminals)
            [term] = client.terminals.values()
            started = time.monotonic()
            await agent.conn.cancel(session_id=sid)
            assert await step(turn, 10) == "cancelled", dump(agent)
            assert time.monotonic() - started < 10
            await client.wait_for(lambda: term.proc.returncode is not None, 5)
            assert client.requests("terminal/kill") or client.requests("terminal/release")

    run(main())


def test_cancel_kills_a_local_command(env: dict[str, str], project: Path) -> None:
    client = TestClient(answer="allow_once", fs=False, terminal=False)
    pidfile = project / "pid"

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            turn = asyncio.create_task(
                agent.prompt(sid, f"ACP:bash echo $$ > {pidfile}; exec sleep 60")
            )
            await client.wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
            pid = int(pidfile.read_text())
            await agent.conn.cancel(session_id=sid)
            assert await step(turn, 10) == "cancelled", dump(agent)
            await client.wait_for(lambda: not _alive(pid), 5)

    run(main())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- persistence, restart, list, load --------------------------------------------------------


def test_each_round_is_on_disk_before_a_kill_and_a_restart_lists_and_replays_it(
    env: dict[str, str], project: Path, tmp_path: Path, acp_upstream: Upstream
) -> None:
    for i in range(5):
        (project / f"round{i}").mkdir()
        (project / f"round{i}" / f"mark{i}.txt").write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    prompt = f"ACP:rounds 5 1.5 {project} KILL-ROUNDS-1"

    async def first_life() -> tuple[str, int]:
        async with running_agent(env, project) as agent:
            sid = await session(agent, project)
            turn = asyncio.create_task(agent.prompt(sid, prompt, timeout=60))
            await agent.client.wait_for(lambda: len(completed(agent.client.tool_calls(sid))) >= 2)
            await asyncio.sleep(0.5)  # the next round's model call takes 1.5 s
            done = len(completed(agent.client.tool_calls(sid)))
            agent.proc.send_signal(signal.SIGKILL)
            await agent.proc.wait()
            turn.cancel()
            return sid, done

    sid, done = run(first_life())
    assert 2 <= done < 5
    stored = sessions_dir(env) / f"{sid}.json"
    text = stored.read_text()
    json.loads(text)  # whole: written atomically
    assert "KILL-ROUNDS-1" in text
    for i in range(done):
        assert f"mark{i}.txt" in text, f"round {i} was done before the kill but is not stored"
    assert "mark4.txt" not in text

    other = TestClient()

    async def second_life() -> None:
        async with running_agent(env, project, other) as agent:
            listed = await step(agent.conn.list_sessions(cwd=str(project)))
            assert sid in [s.session_id for s in listed.sessions]
            assert all(s.cwd == str(project) for s in listed.sessions)
            nothing = await step(agent.conn.list_sessions(cwd=str(elsewhere)))
            assert sid not in [s.session_id for s in nothing.sessions]
            await step(agent.conn.load_session(cwd=str(project), session_id=sid, mcp_servers=[]))
            assert "KILL-ROUNDS-1" in other.text(sid, "user_message_chunk"), dump(agent)
            replayed = other.tool_calls(sid)
            assert len(replayed) >= done, replayed
            assert "Round 0." in other.text(sid)
            # The conversation goes on from what was stored, with a fresh session id beside it.
            assert await agent.prompt(sid, "go on RESUMED-1") == "end_turn", dump(agent)
            assert sid != await session(agent, project)

    run(second_life())
    [resumed] = bodies_with(acp_upstream, "RESUMED-1")
    said = json.dumps(resumed["messages"])
    assert "KILL-ROUNDS-1" in said and "mark0.txt" in said


def test_load_replays_prompts_thoughts_answers_and_tool_calls(
    env: dict[str, str], project: Path
) -> None:
    target = project / "kept.txt"

    async def first_life() -> str:
        async with running_agent(env, project) as agent:
            sid = await session(agent, project)
            await agent.prompt(sid, "ACP:think REPLAY-1")
            await agent.prompt(sid, f"ACP:write {target} kept")
            return sid

    sid = run(first_life())
    assert target.read_text() == "kept"
    other = TestClient()

    async def second_life() -> None:
        async with running_agent(env, project, other) as agent:
            await step(agent.conn.load_session(cwd=str(project), session_id=sid, mcp_servers=[]))
            kinds = [u["sessionUpdate"] for u in other.updates(sid)]
            assert other.text(sid, "user_message_chunk").count("REPLAY-1") == 1
            assert str(target) in other.text(sid, "user_message_chunk")
            assert other.text(sid, "agent_thought_chunk") == "Let me think about this."
            assert "Thought it through." in other.text(sid)
            assert "done: " in other.text(sid)
            assert "tool_call" in kinds, kinds
            [call] = other.tool_calls(sid).values()
            assert call.get("status") == "completed", call
            # Replayed in order: the first prompt before the thought before the tool call.
            assert kinds.index("user_message_chunk") < kinds.index("agent_thought_chunk")
            assert kinds.index("agent_thought_chunk") < kinds.index("tool_call")

    run(second_life())


def test_the_anthropic_wire_api_from_a_config_file_endpoint(
    tmp_path: Path, project: Path, acp_upstream: Upstream
) -> None:
    """An endpoint from the config file (no HELEXA_ACP_BASE_URL/MODEL), speaking Anthropic
    Messages to cortex's /v1/messages; the key comes from the variable the file names."""
    config = f"""default_endpoint = "via-messages"
[[endpoints]]
name = "via-openai"
base_url = "http://127.0.0.1:{free_port()}/v1"
[[endpoints]]
name = "via-messages"
base_url = "{acp_upstream.base}/v1"
wire_api = "anthropic-messages"
model = "helexa/alt"
api_key_env = "MY_CORTEX_KEY"
max_tokens = 512
"""
    env = agent_env(tmp_path / "agent", "unused", config=config, MY_CORTEX_KEY="sk-from-env")
    del env["HELEXA_ACP_BASE_URL"], env["HELEXA_ACP_MODEL"], env["HELEXA_ACP_API_KEY"]
    target = project / "via-messages.txt"
    client = TestClient(answer="allow_once")

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            stop = await agent.prompt(sid, f"ACP:write {target} over messages WIRE-ANTHROPIC-1")
            assert stop == "end_turn", dump(agent)
            assert target.read_text() == "over messages WIRE-ANTHROPIC-1"
            assert "done: " in client.text(sid)

    run(main())
    access = [
        line
        for line in acp_upstream.cortex.log().splitlines()
        if "path=/v1/messages" in line and "model=helexa/alt " in f"{line} "
    ]
    assert access, acp_upstream.cortex.log()[-2000:]
    [first, _second] = bodies_with(acp_upstream, "WIRE-ANTHROPIC-1")
    assert 512 in (first.get("max_tokens"), first.get("max_completion_tokens")), first


# -- failures, a real model ------------------------------------------------------------------


def test_an_unreachable_endpoint_is_a_clear_error_not_a_hang(tmp_path: Path, project: Path) -> None:
    port = free_port()  # nothing listens there
    env = agent_env(tmp_path / "agent", f"http://127.0.0.1:{port}/v1")

    async def main() -> None:
        async with running_agent(env, project) as agent:
            sid = await step(agent.new_session(project), 15)
            started = time.monotonic()
            message = ""
            try:
                stop = await agent.prompt(sid.session_id, "hello?", timeout=30)
                message = agent.client.text(sid.session_id)
                assert stop in ("end_turn", "refusal"), stop
            except RequestError as exc:
                message = f"{exc} {exc.data}"
            assert time.monotonic() - started < 20
            lowered = message.lower()
            assert str(port) in message or "connect" in lowered or "reach" in lowered, message

    run(main())


def test_a_plain_chat_with_a_real_tiny_model(
    tmp_path: Path, project: Path, tiny_upstream: Upstream
) -> None:
    env = agent_env(
        tmp_path / "agent", f"{tiny_upstream.base}/v1", model=TINY_ACP, HELEXA_ACP_MAX_TOKENS="48"
    )
    client = TestClient(answer="reject_once")

    async def main() -> None:
        async with running_agent(env, project, client) as agent:
            sid = await session(agent, project)
            stop = await agent.prompt(sid, "Say hello.", timeout=120)
            assert stop in ("end_turn", "max_tokens"), dump(agent)

    run(main(), timeout=240)
    served = [
        line
        for line in tiny_upstream.cortex.log().splitlines()
        if "path=/v1/chat/completions" in line and f"model={TINY_ACP} " in line
    ]
    assert served and all(" status=200 " in line for line in served), served
    # Random weights: the answer may be an end-of-sequence alone (no text for the panel),
    # so what is checked is that the real model answered the agent's request in full.
