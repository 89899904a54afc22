"""The real OpenAI Codex CLI (the version scripts/clients.pin names, installed from the npm
registry by scripts/dev.sh; HELEXA_CLIENTS for another install) against a real cortex and
the scripted stand-in neuron, with nothing in Codex's config but the provider block
docs/claude-code.md gives. Codex always sends a ``namespace`` tool group (its sub-agent
tools) and the hosted ``web_search`` tool: the first reaches the model as function tools
and its calls come back under the names Codex expects, the second is left out and named
in the access log."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cortex.conftest import Fleet
from tests.support.clients import client

# docs/claude-code.md's provider block, word for word but for the port.
PROVIDER_BLOCK = """\
model = "helexa/default"
model_provider = "helexa"

[model_providers.helexa]
name = "helexa"
base_url = "{base}/v1"
wire_api = "responses"
env_key = "HELEXA_API_KEY"
"""


@pytest.fixture(scope="session")
def codex() -> Path:
    return client("codex")


def run_codex(
    codex: Path, base: str, workdir: Path, prompt: str
) -> tuple[list[dict[str, Any]], str]:
    """``codex exec`` in ``workdir`` with its own home: (its JSON events, its last message)."""
    home = workdir / "home"
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(PROVIDER_BLOCK.format(base=base))
    last = workdir / "last-message.txt"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),  # its own config and sessions, not the developer's
        "CODEX_HOME": str(home / ".codex"),
        "HELEXA_API_KEY": "sk-any-key",
    }
    done = subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "--json", "-o", str(last), prompt],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failures = [e for e in events if e.get("type") in ("turn.failed", "error")]
    assert not failures, failures
    return events, last.read_text()


def received(fleet: Fleet) -> list[dict[str, Any]]:
    url = fleet.neurons["scripted"][1]
    return httpx.get(f"{url}/_received", timeout=5).json()


def sent_by(fleet: Fleet, prompt: str) -> list[dict[str, Any]]:
    """The chat requests the neuron got for a Codex turn whose prompt was ``prompt``."""
    return [b for b in received(fleet) if prompt in json.dumps(b["messages"])]


def test_tool_round_trip(codex: Path, scripted: Fleet, tmp_path: Path) -> None:
    prompt = "CODEX:exec echo proof-$((6*7))"
    events, last = run_codex(codex, scripted.base, tmp_path, prompt)
    # Codex ran the command the model asked for (the shell did the sum) …
    [command] = [
        e["item"]
        for e in events
        if e["type"] == "item.completed" and e["item"]["type"] == "command_execution"
    ]
    assert command["exit_code"] == 0 and command["aggregated_output"] == "proof-42\n"
    # … sent its output back, and printed the model's final answer, which saw it.
    assert last.startswith("Codex saw: ") and "proof-42" in last
    bodies = sent_by(scripted, prompt)
    assert len(bodies) == 2  # the call, then the answer to its output
    [output] = [m for m in bodies[1]["messages"] if m["role"] == "tool"]
    assert "proof-42" in output["content"]
    # The model saw Codex's function tools, those of its namespace group among them, and
    # not the hosted web_search, which the access log names.
    names = {t["function"]["name"] for t in bodies[0]["tools"]}
    assert {"exec_command", "spawn_agent", "wait_agent"} <= names
    assert all(t["type"] == "function" for t in bodies[0]["tools"])
    lines = [line for line in scripted.cortex.log().splitlines() if "path=/v1/responses" in line]
    assert lines and all("omitted_tools=web_search" in line for line in lines[-2:])


def test_namespaced_tool_call_goes_back_to_its_namespace(
    codex: Path, scripted: Fleet, tmp_path: Path
) -> None:
    """The model calls ``wait_agent`` (a tool of Codex's ``multi_agent_v1`` group): the
    call reaches Codex's own handler, which answers about the agent id, rather than
    Codex's "unsupported call" for a name it does not know outside its namespace."""
    prompt = 'CODEX:ns wait_agent {"targets": ["nobody"], "timeout_ms": 10000}'
    _events, last = run_codex(codex, scripted.base, tmp_path, prompt)
    assert last.startswith("Codex saw: ")
    assert "unsupported call" not in last
    assert "nobody" in last  # the handler read the arguments


def test_plain_answer(codex: Path, scripted: Fleet, tmp_path: Path) -> None:
    _events, last = run_codex(codex, scripted.base, tmp_path, "say hello to helexa")
    assert last == "ok: say hello to helexa"
