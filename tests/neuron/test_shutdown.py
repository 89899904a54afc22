"""A neuron of its own: pre-warm with a failing entry, then SIGTERM with streams in flight."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx

from helexa.up.tiny_model import TINY_REPO_ID
from tests.support.procs import start_neuron

STREAM = {
    "model": TINY_REPO_ID,
    "stream": True,
    "max_tokens": 700,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Tell me about the weather in the city."}],
}


def test_prewarm_then_sigterm_drains_streams_and_unloads(tmp_path: Path, hf_cache: Path) -> None:
    daemon, base = start_neuron(
        tmp_path,
        f"""
drain_timeout_s = 60
[admission]
max_concurrent = 2
max_queue = 4
[[default_models]]
model_id = "nobody/absent"
[[default_models]]
model_id = "{TINY_REPO_ID}"
""",
        hf_cache=hf_cache,
    )
    try:
        activation = httpx.get(f"{base}/health").json()["activation"]
        assert activation["state"] == "ready"
        assert activation["completed"] == [TINY_REPO_ID]
        assert [f["model_id"] for f in activation["failed"]] == ["nobody/absent"]
        assert "offline" in activation["failed"][0]["error"]

        streams: list[list[str]] = [[], []]
        started = [threading.Event(), threading.Event()]

        def consume(index: int) -> None:
            with httpx.stream(
                "POST", f"{base}/v1/chat/completions", json=STREAM, timeout=60
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        streams[index].append(line.removeprefix("data: "))
                        if len(streams[index]) == 3:
                            started[index].set()

        queued: dict[str, httpx.Response] = {}

        def wait_in_queue() -> None:
            queued["r"] = httpx.post(
                f"{base}/v1/chat/completions", json={**STREAM, "stream": False}, timeout=60
            )

        threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        assert all(event.wait(30) for event in started)
        queued_stream: dict[str, object] = {}

        def stream_in_queue() -> None:  # its headers come at once: waiting is not silence
            with httpx.stream(
                "POST", f"{base}/v1/chat/completions", json=STREAM, timeout=60
            ) as response:
                queued_stream["status"] = response.status_code
                queued_stream["body"] = response.read().decode()

        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        queued_streamer = threading.Thread(target=stream_in_queue)
        queued_streamer.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health").json()["models"][TINY_REPO_ID]["queued"] < 2:
            assert time.monotonic() < deadline, "third and fourth requests never queued"
            time.sleep(0.02)

        daemon.signal(signal.SIGTERM)
        for thread in (*threads, waiter, queued_streamer):
            thread.join(60)
        assert daemon.proc is not None
        assert daemon.proc.wait(60) == 0

        for frames in streams:  # both in-flight streams finished properly
            assert frames[-1] == "[DONE]"
            final = json.loads(frames[-2])
            assert final["choices"][0]["finish_reason"] in {"stop", "length"}
        rejected = queued["r"]
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == "shutting_down"
        assert rejected.headers["retry-after"]
        # The queued stream had its headers and opening (role) chunk at once: the drain's
        # 503 is its error event, and its body ends properly (no text, no [DONE]).
        assert queued_stream["status"] == 200
        events = [e for e in str(queued_stream["body"]).split("\n\n") if e.startswith("data: ")]
        assert len(events) == 2, events
        role = json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]
        assert role == {"role": "assistant", "content": ""}
        assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == "shutting_down"
        log = daemon.log()
        assert "drain started" in log
        assert f"msg=unloaded model_id={TINY_REPO_ID}" in log
        assert log.index("drain started") < log.index("msg=unloaded")
    finally:
        daemon.stop()


def test_the_drain_deadline_ends_what_is_still_running_with_shutting_down(
    tmp_path: Path, hf_cache: Path
) -> None:
    """SIGTERM with a drain deadline of 0: the queued request gets its 503 at once, and the
    deadline then cuts what is generating: the stream ends with an error event and a clean
    end of body (no [DONE], no truncated transfer), the non-stream answer is a 503; all with
    code ``shutting_down`` so cortex can retry them elsewhere."""
    daemon, base = start_neuron(
        tmp_path,
        f"""
drain_timeout_s = 0
[admission]
max_concurrent = 2
max_queue = 4
[[default_models]]
model_id = "{TINY_REPO_ID}"
""",
        hf_cache=hf_cache,
    )
    long = {**STREAM, "max_tokens": 1900}  # far longer than the test takes to get to SIGTERM
    try:
        frames: list[str] = []
        broken: list[Exception] = []
        started = threading.Event()

        def consume() -> None:
            try:
                with httpx.stream(
                    "POST", f"{base}/v1/chat/completions", json=long, timeout=60
                ) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            frames.append(line.removeprefix("data: "))
                            if len(frames) == 3:
                                started.set()
            except httpx.HTTPError as exc:  # e.g. the body cut off mid-transfer
                broken.append(exc)

        replies: dict[str, httpx.Response] = {}

        def ask(name: str) -> None:
            replies[name] = httpx.post(
                f"{base}/v1/chat/completions", json={**long, "stream": False}, timeout=60
            )

        def wait_for(what: str, count: int) -> None:
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/health").json()["models"][TINY_REPO_ID][what] < count:
                assert time.monotonic() < deadline, f"never {count} {what}"
                time.sleep(0.02)

        streamer = threading.Thread(target=consume)
        streamer.start()
        assert started.wait(60)
        running = threading.Thread(target=ask, args=("running",))
        running.start()
        wait_for("in_flight", 2)
        queued = threading.Thread(target=ask, args=("queued",))
        queued.start()
        wait_for("queued", 1)

        daemon.signal(signal.SIGTERM)
        for thread in (streamer, running, queued):
            thread.join(60)
        assert daemon.proc is not None
        assert daemon.proc.wait(60) == 0

        assert not broken, broken  # the stream's body ended properly
        assert "[DONE]" not in frames
        error = json.loads(frames[-1])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
        assert any(json.loads(f)["choices"][0]["delta"].get("content") for f in frames[1:-1])
        for name in ("running", "queued"):
            reply = replies[name]
            assert reply.status_code == 503, reply.text
            assert reply.json()["error"]["code"] == "shutting_down"
            assert int(reply.headers["retry-after"]) >= 1
        assert "drain deadline" in replies["running"].json()["error"]["message"]
        assert "drain deadline" not in replies["queued"].json()["error"]["message"]
        assert "drain deadline: generations cut" in daemon.log()
    finally:
        daemon.stop()
