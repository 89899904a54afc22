"""Tools for a chat template that cannot render them (SmolLM2's, for one): described in a
generic tool-calling system prompt, as llama-server's generic tool format does, never
silently dropped. The output parser reads the model's ``<tool_call>`` lines back as calls."""

from __future__ import annotations

import functools
import json
from typing import Any

from helexa.neuron.output_parser import CALL_CLOSE, CALL_OPEN


@functools.lru_cache(maxsize=64)
def renders_tools(template: str) -> bool:
    """Whether a chat template reads ``tools`` at all (SmolLM2's, for one, does not)."""
    import jinja2
    import jinja2.meta

    try:
        return "tools" in jinja2.meta.find_undeclared_variables(
            jinja2.Environment().parse(template)
        )
    except jinja2.TemplateError:
        return True  # not ours to judge: rendering says what is wrong with it


GENERIC_TOOLS = """You can call these tools; each one's arguments follow its JSON Schema:
{tools}

To call a tool, answer with one line per call, each exactly of this form and nothing else:
<tool_call>{{"name": "<tool name>", "arguments": {{<the arguments as JSON>}}}}</tool_call>
The results come back in a message that starts with <tool_response>. When no tool is needed, \
answer directly."""


def generic_tool_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation for a template that cannot render tools (as llama-server's generic
    tool format does): the tools described in the system turn, earlier calls written as
    ``<tool_call>`` lines, results as ``<tool_response>`` user turns. The output parser reads
    the model's ``<tool_call>`` lines back as calls."""
    described = "\n".join(
        json.dumps(
            {
                "name": (tool.get("function") or {}).get("name"),
                "description": (tool.get("function") or {}).get("description", ""),
                "parameters": (tool.get("function") or {}).get("parameters", {}),
            },
            ensure_ascii=False,
        )
        for tool in tools
    )
    preamble = GENERIC_TOOLS.format(tools=described)
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                CALL_OPEN
                + json.dumps(
                    {
                        "name": (call.get("function") or {}).get("name"),
                        "arguments": (call.get("function") or {}).get("arguments", {}),
                    },
                    ensure_ascii=False,
                )
                + CALL_CLOSE
                for call in message["tool_calls"]
            ]
            out.append(
                {"role": "assistant", "content": "\n".join([c for c in [content] if c] + calls)}
            )
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_responses"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + response}
            else:
                out.append({"role": "user", "content": response, "tool_responses": True})
        else:
            out.append({k: v for k, v in message.items() if k != "tool_calls"})
    for message in out:
        message.pop("tool_responses", None)
    if not tools:
        return out
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}"}
    else:
        out.insert(0, {"role": "system", "content": preamble})
    return out
