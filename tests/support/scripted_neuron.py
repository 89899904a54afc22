"""A neuron stand-in that answers chat completions from a script, for tool-calling tests
(the tiny random model cannot be made to call tools). Its OpenAI output has exactly the
shape the real neuron's parser produces; cortex in front of it is the real one.

    python -m tests.support.scripted_neuron --port N
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "scripted/qwen"
RECEIVED: list[dict[str, Any]] = []

WEATHER_ARGS = '{"city": "Paris", "unit": "celsius"}'


PROOF = re.compile(r"PROOF:([^\s\"'\\\]]+)")
TOOL_SEARCH = re.compile(r"TOOLSEARCH:([\w:,+-]+)")
LOADED = re.compile(r'<functions>\n<function>\{"name": "(\w+)"')


def _since_assistant(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages after the last assistant turn (tool results, reminders, the prompt)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant":
            return messages[index + 1 :]
    return messages


def _call(index: int, call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "tool_calls": [
            {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
        ]
    }


def claude_code_script(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Claude Code's own tools: write the proof file(s) the prompt names, in parallel, then
    answer with what the tools reported. None when the request is not such a turn."""
    names = {t["function"]["name"] for t in body.get("tools") or []}
    if "Write" not in names:
        return None
    recent = _since_assistant(body["messages"])
    results = [m for m in recent if m["role"] == "tool"]
    loaded = LOADED.match(str(results[-1]["content"])) if results else None
    if loaded:  # ToolSearch gave a deferred tool's definition: call it
        return [
            _call(0, "call_loaded0", loaded.group(1), {}),
            {"finish_reason": "tool_calls"},
        ]
    if results:
        reported = " | ".join(str(m["content"])[:80] for m in results)
        return [{"content": f"All done. Tools said: {reported}"}, {"finish_reason": "stop"}]
    prompt = json.dumps([m.get("content") for m in recent if m["role"] == "user"])
    if search := TOOL_SEARCH.search(prompt):  # find a deferred tool, then call it
        return [
            _call(0, "call_ts0", "ToolSearch", {"query": search.group(1), "max_results": 1}),
            {"finish_reason": "tool_calls"},
        ]
    paths = PROOF.findall(prompt)
    if not paths:
        return [{"content": "Nothing to write."}, {"finish_reason": "stop"}]
    thinking = (body.get("chat_template_kwargs") or {}).get("enable_thinking")
    deltas: list[dict[str, Any]] = [{"reasoning_content": "I will write the files."}] * bool(
        thinking
    )
    deltas.append({"content": "Writing."})
    for index, path in enumerate(paths):
        deltas.append(
            _call(
                index, f"call_w{index}", "Write", {"file_path": path, "content": f"proof {index}\n"}
            )
        )
    deltas.append({"finish_reason": "tool_calls"})
    return deltas


ACP_TOOLS = {"write_file", "edit_file"}
ACP_DIRECTIVE = re.compile(r"ACP:(\w+)[ \t]*([^\n]*)")


def _text(content: Any) -> str:
    """A message's text, whether a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def acp_directive(body: dict[str, Any]) -> tuple[str, str] | None:
    """(verb, rest of the line) of the ``ACP:verb ...`` cue in the last user message, if the
    request comes from helexa-acp (its tool set has write_file and edit_file)."""
    names = {t["function"]["name"] for t in body.get("tools") or []}
    if not ACP_TOOLS.issubset(names):
        return None
    users = [m for m in body["messages"] if m["role"] == "user"]
    found = ACP_DIRECTIVE.search(_text(users[-1]["content"])) if users else None
    return (found.group(1), found.group(2).strip()) if found else ("say", "")


def acp_delay(body: dict[str, Any]) -> float:
    """Seconds to wait before answering an helexa-acp request: ``ACP:slow S`` and each
    round of ``ACP:rounds N S``. Only the last user message counts, so a cancelled slow
    prompt still in the history does not slow the next one."""
    cue = acp_directive(body)
    if cue is None:
        return 0.0
    verb, rest = cue
    args = rest.split()
    if verb == "slow" and args:
        return float(args[0])
    if verb == "rounds" and len(args) > 1 and len(_acp_calls_since_user(body)) < int(args[0]):
        return float(args[1])
    return 0.0


def _acp_calls_since_user(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The assistant tool-call turns since the last user message."""
    messages = body["messages"]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    later = messages[last_user + 1 :]
    return [m for m in later if m["role"] == "assistant" and m.get("tool_calls")]


def acp_script(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """helexa-acp's tools (read_file, list_dir, write_file, edit_file, bash, grep), on the
    cue the test wrote in the last user message:

        ACP:write PATH CONTENT     write_file (CONTENT: the rest of the line, \\n a newline)
        ACP:edit PATH OLD NEW      edit_file
        ACP:bash COMMAND           bash (COMMAND: the rest of the line)
        ACP:read PATH              read_file
        ACP:grep PATTERN PATH      grep
        ACP:slow S                 wait S seconds, then answer in text (cancel tests)
        ACP:rounds N S [DIR]       N rounds of list_dir DIR/roundI, each a model call that
                                   waits S seconds first (kill tests); DIR defaults to "."
        ACP:think                  reasoning_content, then text
        ACP:truncate               text, then finish_reason "length"
        anything else              a plain text answer echoing the prompt

    Once the tool results are back (role "tool" after the last assistant turn) the answer
    is "done: " and the first 200 characters of each result. None when the request is not
    helexa-acp's."""
    cue = acp_directive(body)
    if cue is None:
        return None
    verb, rest = cue
    args = rest.split()
    recent = _since_assistant(body["messages"])
    results = [m for m in recent if m["role"] == "tool"]
    calls = _acp_calls_since_user(body)
    if verb == "rounds" and args and len(calls) < int(args[0]):
        base = args[2] if len(args) > 2 else "."
        path = f"{base.rstrip('/')}/round{len(calls)}"
        return [
            {"content": f"Round {len(calls)}."},
            _call(0, f"call_r{len(calls)}_{len(body['messages'])}", "list_dir", {"path": path}),
            {"finish_reason": "tool_calls"},
        ]
    if results and calls:
        said = " | ".join(_text(m["content"])[:200] for m in results)
        return [{"content": "done: "}, {"content": said}, {"finish_reason": "stop"}]
    if verb == "think":
        return [
            {"reasoning_content": "Let me think "},
            {"reasoning_content": "about this."},
            {"content": "Thought it through."},
            {"finish_reason": "stop"},
        ]
    if verb == "slow":
        return [{"content": "Slow answer."}, {"finish_reason": "stop"}]
    if verb == "truncate":  # the answer ran into max_tokens
        return [{"content": "This answer is cut"}, {"finish_reason": "length"}]
    tool: tuple[str, dict[str, Any]] | None = None
    if verb == "write" and args:
        content = rest[len(args[0]) :].strip().replace("\\n", "\n")
        tool = ("write_file", {"path": args[0], "content": content})
    elif verb == "edit" and len(args) >= 3:
        tool = ("edit_file", {"path": args[0], "old": args[1], "new": args[2]})
    elif verb == "bash" and rest:
        tool = ("bash", {"command": rest})
    elif verb == "read" and args:
        tool = ("read_file", {"path": args[0]})
    elif verb == "grep" and args:
        tool = ("grep", {"pattern": args[0], **({"path": args[1]} if len(args) > 1 else {})})
    if tool is None:
        users = [m for m in body["messages"] if m["role"] == "user"]
        echo = _text(users[-1]["content"])[:100] if users else ""
        return [{"content": "ok: "}, {"content": echo}, {"finish_reason": "stop"}]
    return [
        {"content": f"Calling {tool[0]}."},
        _call(0, f"call_{verb}_{len(body['messages'])}", tool[0], tool[1]),  # unique ids
        {"finish_reason": "tool_calls"},
    ]


CODEX_DIRECTIVE = re.compile(r"CODEX:(\w+)[ \t]*([^\n]*)")


def codex_script(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The Codex CLI's tools (it always offers exec_command), on the cue in its prompt:

        CODEX:exec COMMAND     exec_command {"cmd": COMMAND}
        CODEX:ns TOOL JSON     a call to TOOL (one of a namespace group's tools) with JSON
        anything else          a plain answer echoing the prompt

    Once a tool's output is back the answer is "Codex saw: " and the first 300
    characters of each output. None when the request is not Codex's."""
    names = {t["function"]["name"] for t in body.get("tools") or []}
    if "exec_command" not in names:
        return None
    recent = _since_assistant(body["messages"])
    results = [m for m in recent if m["role"] == "tool"]
    if results:
        said = " | ".join(_text(m["content"])[:300] for m in results)
        return [{"content": "Codex saw: "}, {"content": said}, {"finish_reason": "stop"}]
    users = [m for m in body["messages"] if m["role"] == "user"]
    prompt = _text(users[-1]["content"]) if users else ""
    cue = CODEX_DIRECTIVE.search(prompt)
    if cue is None:
        return [{"content": "ok: "}, {"content": prompt[:100]}, {"finish_reason": "stop"}]
    verb, rest = cue.group(1), cue.group(2).strip()
    if verb == "exec":
        call = ("exec_command", {"cmd": rest})
    else:  # ns
        tool, _, arguments = rest.partition(" ")
        call = (tool, json.loads(arguments or "{}"))
    return [
        {"content": f"Running {call[0]}."},
        _call(0, f"call_{verb}_{len(body['messages'])}", call[0], call[1]),
        {"finish_reason": "tool_calls"},
    ]


def script_for(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Deltas for one answer: a tool-call turn, or the answer after a tool result."""
    scripted = claude_code_script(body)
    if scripted is not None:
        return scripted
    scripted = codex_script(body)
    if scripted is not None:
        return scripted
    scripted = acp_script(body)
    if scripted is not None:
        return scripted
    last = body["messages"][-1]
    if last["role"] == "tool":
        return [
            {"content": "It is "},
            {"content": f"{last['content']} in Paris."},
            {"finish_reason": "stop"},
        ]
    if not body.get("tools"):
        return [{"content": "No tools, "}, {"content": "plain answer."}, {"finish_reason": "stop"}]
    deltas: list[dict[str, Any]] = [
        {"reasoning_content": "The user asks about "},
        {"reasoning_content": "weather; use the tool."},
        {"content": "Let me check."},
    ]
    # The call arrives whole in the real neuron; split it here to exercise accumulation.
    call_id = "call_abc123"
    pieces = [WEATHER_ARGS[i : i + 7] for i in range(0, len(WEATHER_ARGS), 7)]
    deltas.append(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    )
    deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in pieces]
    if "time" in json.dumps(body["messages"]):
        deltas.append(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "call_def456",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                    }
                ]
            }
        )
    deltas.append({"finish_reason": "tool_calls"})
    return deltas


def chunk(delta: dict[str, Any], created: int) -> dict[str, Any]:
    finish = delta.pop("finish_reason", None)
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
            }
        ],
    }


NAME = {"value": "scripted"}  # --name: fault cues can address one stand-in of several


async def chat(request: Request) -> Response:
    body = await request.json()
    RECEIVED.append(body)
    said = json.dumps(body["messages"])
    if f"DRAIN:{NAME['value']}" in said:  # as a draining neuron answers a queued request
        return JSONResponse(
            {
                "error": {
                    "message": "the neuron is shutting down",
                    "type": "service_unavailable",
                    "code": "shutting_down",
                    "param": None,
                }
            },
            status_code=503,
            headers={"Retry-After": "1"},
        )
    if slow := re.search(r"SLOW:([0-9.]+)", said):  # a long generation
        await asyncio.sleep(float(slow.group(1)))
    if delay := acp_delay(body):
        # As a real generation stops when its client leaves (a cancelled prompt).
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return Response(status_code=499)
            await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
    deltas = script_for(body)
    usage = {
        "prompt_tokens": 42,
        "completion_tokens": len(deltas),
        "total_tokens": 42 + len(deltas),
    }
    created = int(time.time())
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": None}
        calls: dict[int, dict[str, Any]] = {}
        finish = "stop"
        for delta in deltas:
            finish = delta.get("finish_reason", finish)
            for key in ("content", "reasoning_content"):
                if delta.get(key):
                    message[key] = (message.get(key) or "") + delta[key]
            for call in delta.get("tool_calls", []):
                slot = calls.setdefault(
                    call["index"],
                    {
                        "id": call.get("id"),
                        "type": "function",
                        "function": {"name": "", "arguments": ""},
                    },
                )
                slot["function"]["name"] += call["function"].get("name", "")
                slot["function"]["arguments"] += call["function"].get("arguments", "")
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        return JSONResponse(
            {
                "id": "chatcmpl-scripted",
                "object": "chat.completion",
                "created": created,
                "model": MODEL,
                "usage": usage,
                "choices": [
                    {"index": 0, "message": message, "finish_reason": finish, "stop_reason": None}
                ],
            }
        )

    async def events():  # type: ignore[no-untyped-def]
        opening = chunk({"role": "assistant", "content": ""}, created)
        if (body.get("stream_options") or {}).get("include_usage"):
            # As the real neuron does: the prompt's usage in the opening chunk.
            opening["usage"] = {"prompt_tokens": 42, "completion_tokens": 0, "total_tokens": 42}
        yield "data: " + json.dumps(opening) + "\n\n"
        for delta in deltas:
            await asyncio.sleep(0.002)
            yield "data: " + json.dumps(chunk(dict(delta), created)) + "\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            yield (
                "data: "
                + json.dumps(
                    {
                        "id": "chatcmpl-scripted",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": MODEL,
                        "choices": [],
                        "usage": usage,
                    }
                )
                + "\n\n"
            )
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def tokenize(request: Request) -> Response:
    body = await request.json()
    return JSONResponse({"count": len(json.dumps(body.get("messages", []))) // 4})


def _static(payload: Any):  # type: ignore[no-untyped-def]
    async def handler(_request: Request) -> Response:
        return JSONResponse(payload)

    return handler


async def received(_request: Request) -> Response:
    return JSONResponse(RECEIVED)


MODELS = [
    {
        "id": MODEL,
        "harness": "transformers",
        "status": "loaded",
        "devices": [],
        "vram_used_mb": 1,
        "context_length": 32768,
    }
]
app = Starlette(
    routes=[
        Route(
            "/discovery",
            _static(
                {
                    "hostname": "scripted",
                    "os": "test",
                    "kernel": "test",
                    "cuda_version": None,
                    "driver_version": None,
                    "devices": [],
                    "cpu": {"cores": 1, "memory_total_mb": 1000},
                    "harnesses": ["transformers"],
                }
            ),
        ),
        Route(
            "/health",
            _static(
                {
                    "uptime_secs": 1.0,
                    "devices": [],
                    "cpu": {"memory_used_mb": 1, "memory_free_mb": 900},
                    "activation": {
                        "state": "ready",
                        "pending": [],
                        "in_progress": None,
                        "completed": [MODEL],
                        "failed": [],
                    },
                    "models": {MODEL: {"in_flight": 0, "queued": 0}},
                }
            ),
        ),
        Route("/models", _static(MODELS)),
        Route(
            "/models/load",
            _static({"status": "already_loaded", "model": MODELS[0]}),
            methods=["POST"],
        ),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/_received", received),
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="scripted")
    args = parser.parse_args()
    NAME["value"] = args.name
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
