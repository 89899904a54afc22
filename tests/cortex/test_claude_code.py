"""The real Claude Code CLI (the version scripts/clients.pin names, installed from the npm
registry by scripts/dev.sh; HELEXA_CLIENTS for another install) against a real cortex: a
scripted stand-in neuron answers with valid calls for the tools Claude Code actually
sends, and a real neuron serves the `cortex up --tiny` demo model. Nothing is set on the
client but ANTHROPIC_BASE_URL and an API key."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helexa.up.run import CONTEXT_TOKENS
from helexa.up.tiny_model import DEMO_SHAPE, write_tiny_model_to_hf_cache
from tests.cortex.conftest import Fleet
from tests.support.clients import client
from tests.support.fleet import start_cortex
from tests.support.procs import start_neuron

DEMO_REPO = "helexa/tiny-demo"


@pytest.fixture(scope="session")
def claude() -> Path:
    return client("claude")


def run_claude(
    claude: Path, base: str, workdir: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),  # its own settings and session files, not the developer's
        "ANTHROPIC_BASE_URL": base,
        "ANTHROPIC_API_KEY": "sk-any-key",
    }
    return subprocess.run(
        [str(claude), "-p", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def blocks(stream: list[dict[str, Any]], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """(message id, block) for every assistant content block of ``kind``."""
    return [
        (event["message"]["id"], block)
        for event in stream
        if event.get("type") == "assistant"
        for block in event["message"]["content"]
        if block["type"] == kind
    ]


@pytest.mark.parametrize("model", [None, "helexa/default", "claude-sonnet-4-5"])
def test_tool_round_trip_with_parallel_calls(
    claude: Path, scripted: Fleet, tmp_path: Path, model: str | None
) -> None:
    first, second = tmp_path / "proof-a.txt", tmp_path / "proof-b.txt"
    args = [f"Write the proof files PROOF:{first} and PROOF:{second}"]
    args += ["--output-format", "stream-json", "--verbose", "--permission-mode", "acceptEdits"]
    if model:
        args += ["--model", model]
    done = run_claude(claude, scripted.base, tmp_path, *args)
    assert done.returncode == 0, done.stderr + done.stdout
    # The tool really ran: Claude Code wrote the files the model asked for.
    assert first.read_text() == "proof 0\n" and second.read_text() == "proof 1\n"
    stream = events(done.stdout)
    assert [b["thinking"] for _, b in blocks(stream, "thinking")] == ["I will write the files."]
    calls = blocks(stream, "tool_use")
    assert [b["name"] for _, b in calls] == ["Write", "Write"]
    assert len({message_id for message_id, _ in calls}) == 1  # one turn: parallel calls
    [result] = [e for e in stream if e.get("type") == "result"]
    assert result["subtype"] == "success" and not result["is_error"]
    assert result["result"].startswith("All done. Tools said: File created successfully")
    # The tool results went back to the model as tool messages, one per call.
    url = scripted.neurons["scripted"][1]
    bodies = httpx.get(f"{url}/_received", timeout=5).json()
    answered = [
        m["tool_call_id"]
        for body in bodies
        for m in body["messages"]
        if m["role"] == "tool" and str(first) in json.dumps(body)
    ]
    assert {"call_w0", "call_w1"} <= set(answered)


def test_tool_search_loads_and_calls_a_deferred_tool(
    claude: Path, scripted: Fleet, tmp_path: Path
) -> None:
    """Claude Code sends most of its tools deferred (ToolSearch, defer_loading): the model
    calls ToolSearch, Claude Code answers with a tool_reference, cortex expands it into the
    tool's definition, and the model's call to the tool it loaded runs."""
    args = ["TOOLSEARCH:select:CronList", "--output-format", "stream-json", "--verbose"]
    done = run_claude(claude, scripted.base, tmp_path, *args)
    assert done.returncode == 0, done.stderr + done.stdout
    stream = events(done.stdout)
    assert [b["name"] for _, b in blocks(stream, "tool_use")] == ["ToolSearch", "CronList"]
    [result] = [e for e in stream if e.get("type") == "result"]
    assert result["subtype"] == "success", result
    assert result["result"] == "All done. Tools said: No scheduled jobs."
    url = scripted.neurons["scripted"][1]
    [after] = [
        body
        for body in httpx.get(f"{url}/_received", timeout=5).json()
        if any(m.get("tool_call_id") == "call_ts0" for m in body["messages"])
        and not any(m.get("tool_call_id") == "call_loaded0" for m in body["messages"])
    ]
    # The deferred tools stay out of the tool list (its prefix is unchanged)…
    names = {t["function"]["name"] for t in after["tools"]}
    assert "ToolSearch" in names and not {"CronList", "DeferredToolPlaceholder"} & names
    # … and the definition stands where ToolSearch's result does.
    [loaded] = [m for m in after["messages"] if m.get("tool_call_id") == "call_ts0"]
    assert loaded["content"].startswith('<functions>\n<function>{"name": "CronList"')


def test_context_command_counts_tokens(claude: Path, scripted: Fleet, tmp_path: Path) -> None:
    done = run_claude(claude, scripted.base, tmp_path, "/context")
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Context Usage" in done.stdout
    assert "path=/v1/messages/count_tokens" in scripted.cortex.log()


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory, hf_cache: Path) -> Iterator[Fleet]:
    """A real neuron with the `cortex up --tiny` model (its Q8_0 GGUF on llama.cpp, with
    cortex up's context), behind a cortex configured as `cortex up` configures it (alias
    helexa/default, claude-* fallback)."""
    work = tmp_path_factory.mktemp("demo")
    write_tiny_model_to_hf_cache(hf_cache, DEMO_REPO, with_gguf=True, **DEMO_SHAPE)
    neuron, url = start_neuron(
        work,
        f"[harness.llamacpp]\ncontext_tokens = {CONTEXT_TOKENS}\n"
        f'[[default_models]]\nmodel_id = "{DEMO_REPO}"\nquant = "Q8_0"\n',
        hf_cache=hf_cache,
        name="demo-neuron",
    )
    models = (
        f'[[models]]\nid = "{DEMO_REPO}"\nquant = "Q8_0"\nmin_devices = 0\n'
        f'[aliases]\n"helexa/default" = "{DEMO_REPO}"\n'
        f'[fallbacks]\n"claude-*" = "{DEMO_REPO}"\n'
    )
    cortex, base, metrics = start_cortex(work, {"demo": url}, models)
    yield Fleet(cortex, base, metrics, {"demo": (neuron, url)})
    cortex.stop()
    neuron.stop()


def test_claude_code_against_the_tiny_demo_model(claude: Path, demo: Fleet, tmp_path: Path) -> None:
    """Claude Code's own prompt (system prompt and ~25 tools) fits the demo model's context
    and the real neuron answers it; message_start carries the real prompt count."""
    [served] = httpx.get(f"{demo.neurons['demo'][1]}/models", timeout=5).json()
    assert served["harness"] == "llamacpp" and served["context_length"] == CONTEXT_TOKENS
    done = run_claude(
        claude,
        demo.base,
        tmp_path,
        "hello",
        "--output-format",
        "stream-json",
        "--verbose",
        timeout=240,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    [result] = [e for e in events(done.stdout) if e.get("type") == "result"]
    assert result["subtype"] == "success", result
    assert result["usage"]["input_tokens"] > 20000  # tens of thousands: its real prompt
    counts = [
        int(line.split("prompt_tokens=")[1].split()[0])
        for line in demo.cortex.log().splitlines()
        if "path=/v1/messages " in line and "prompt_tokens=" in line
    ]
    assert counts and max(counts) > 20000
