"""helexa-acp's agent in process with a fake endpoint and a fake editor connection:
cancels that arrive while a prompt waits, shutdown with turns in flight, session saves off
the event loop, and editor terminals that are slow to kill or release."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from acp.schema import PromptResponse, TextContentBlock

from helexa.acp.agent import HelexaAgent
from helexa.acp.config import AcpConfig, EndpointConfig
from helexa.acp.store import SessionStore, StoredSession, snapshot
from helexa.acp.workspace import ClientCaps, Workspace
from helexa.core.stream import Finish, StreamEvent, TextDelta


class SlowEndpoint:
    """First call: streams, then blocks until cancelled and takes ``unwind_s`` to close.
    Later calls: a short answer."""

    def __init__(self, unwind_s: float = 0.3) -> None:
        self.config = EndpointConfig()
        self.unwind_s = unwind_s
        self.calls = 0
        self.streaming = asyncio.Event()
        self.events: list[str] = []

    async def stream(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], model: str, mt: int
    ) -> AsyncIterator[StreamEvent]:
        self.calls += 1
        if self.calls > 1:
            yield TextDelta("second answer")
            yield Finish("stop")
            return
        yield TextDelta("partial ")
        self.streaming.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(self.unwind_s)
            self.events.append("stream closed")

    async def list_models(self, timeout_s: float) -> list[str]:
        return []

    async def aclose(self) -> None:
        self.events.append("endpoint closed")


class FakeConn:
    async def session_update(self, session_id: str, update: Any) -> None:
        return None


def make_agent(tmp_path: Path, endpoint: SlowEndpoint) -> HelexaAgent:
    config = AcpConfig(sessions_dir=tmp_path / "sessions")
    agent = HelexaAgent(config, endpoint_factory=lambda _config: endpoint)
    agent.on_connect(FakeConn())
    return agent


def text(value: str) -> list[Any]:
    return [TextContentBlock(type="text", text=value)]


async def start(agent: HelexaAgent, endpoint: SlowEndpoint, cwd: Path) -> tuple[str, Any]:
    """A session and its first prompt, streaming."""
    sid = (await agent.new_session(cwd=str(cwd))).session_id
    first = asyncio.create_task(agent.prompt(sid, text("one")))
    await asyncio.wait_for(endpoint.streaming.wait(), 5)
    return sid, first


def test_a_cancel_while_a_prompt_waits_for_the_last_turn_cancels_it_too(tmp_path: Path) -> None:
    endpoint = SlowEndpoint()
    agent = make_agent(tmp_path, endpoint)

    async def main() -> list[PromptResponse]:
        sid, first = await start(agent, endpoint, tmp_path)
        second = asyncio.create_task(agent.prompt(sid, text("two")))
        await asyncio.sleep(0.05)  # the second prompt now waits for the first to unwind
        await agent.cancel(sid)
        answers = list(await asyncio.wait_for(asyncio.gather(first, second), 5))
        assert endpoint.calls == 1  # the second prompt never reached the model
        answers.append(await asyncio.wait_for(agent.prompt(sid, text("three")), 5))
        return answers

    stops = [r.stop_reason for r in asyncio.run(main())]
    assert stops == ["cancelled", "cancelled", "end_turn"]  # the cancel does not linger


def test_close_cancels_live_turns_before_closing_their_endpoint(tmp_path: Path) -> None:
    endpoint = SlowEndpoint()
    agent = make_agent(tmp_path, endpoint)

    async def main() -> tuple[str, PromptResponse]:
        sid, first = await start(agent, endpoint, tmp_path)
        await asyncio.wait_for(agent.aclose(), 5)
        return sid, await asyncio.wait_for(first, 5)

    sid, answer = asyncio.run(main())
    assert answer.stop_reason == "cancelled"
    assert endpoint.events == ["stream closed", "endpoint closed"]
    stored = agent.store.load(sid)
    assert stored is not None and stored.messages[-1]["content"] == "partial "


def test_sessions_are_saved_off_the_event_loop_and_never_stale(tmp_path: Path) -> None:
    endpoint = SlowEndpoint()
    agent = make_agent(tmp_path, endpoint)
    threads: list[int] = []
    write = agent.store.write

    def recording_write(session_id: str, data: str, seq: int | None = None) -> bool:
        threads.append(threading.get_ident())
        return write(session_id, data, seq)

    agent.store.write = recording_write  # type: ignore[method-assign]
    asyncio.run(agent.new_session(cwd=str(tmp_path)))
    assert threads and threading.get_ident() not in threads
    store = SessionStore(tmp_path / "other")
    session = StoredSession(id="s1", cwd="/p", model="m", title="newer")
    assert store.write("s1", snapshot(session), seq=2)
    assert not store.write("s1", snapshot(session.model_copy(update={"title": "older"})), 1)
    loaded = store.load("s1")
    assert loaded is not None and loaded.title == "newer"


class HangingTerminalClient:
    """An editor whose terminal never exits and that never answers kill or release."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def create_terminal(self, **kwargs: Any) -> Any:
        return SimpleNamespace(terminal_id="t1")

    async def wait_for_terminal_exit(self, **kwargs: Any) -> Any:
        await asyncio.sleep(3600)

    async def terminal_output(self, **kwargs: Any) -> Any:
        return SimpleNamespace(output="", truncated=False, exit_status=None)

    async def kill_terminal(self, **kwargs: Any) -> None:
        self.asked.append("kill")
        await asyncio.sleep(3600)

    async def release_terminal(self, **kwargs: Any) -> None:
        self.asked.append("release")
        await asyncio.sleep(3600)


def test_a_slow_editor_cannot_stall_a_cancel_or_a_timeout(tmp_path: Path) -> None:
    client = HangingTerminalClient()
    caps = ClientCaps(terminal=True)
    ws = Workspace(client, "s", caps, timeout_s=0.1, cleanup_timeout_s=0.1)

    async def timed_out() -> bool:
        return (await asyncio.wait_for(ws.run("sleep 99", tmp_path), 5)).timed_out

    assert asyncio.run(timed_out())
    assert client.asked == ["kill", "release"]
    client.asked.clear()
    slow = Workspace(client, "s", caps, timeout_s=60, cleanup_timeout_s=0.1)

    async def cancelled() -> bool:
        task = asyncio.create_task(slow.run("sleep 99", tmp_path))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        return task.cancelled()

    assert asyncio.run(cancelled())
    assert client.asked == ["kill", "release"]
