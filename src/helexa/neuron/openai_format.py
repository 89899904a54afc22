"""OpenAI response objects and stream chunks (pure functions, no I/O)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from helexa.core.stream import Output, TextDelta, Usage, openai_delta, openai_usage
from helexa.neuron.harness.base import Finish


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_of(finish: Finish) -> dict[str, Any]:
    return openai_usage(Usage(finish.prompt_tokens, finish.completion_tokens))


def finish_reason(finish: Finish, *, tool_calls: bool) -> str:
    if tool_calls and finish.reason == "stop":
        return "tool_calls"
    return "length" if finish.reason == "length" else "stop"


class ChunkFactory:
    """Builds the chunks of one streamed answer (shared id, created, model)."""

    def __init__(self, model: str, *, chat: bool) -> None:
        self.id = completion_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        self.chat = chat
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def role(self, prompt_tokens: int | None = None) -> dict[str, Any]:
        """The opening chunk. With ``prompt_tokens`` (streams that asked for usage) it
        carries the prompt's usage at once, so a translator can report the input count
        before any text (Anthropic's ``message_start``); the last chunk has the totals."""
        chunk = self._chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
        if prompt_tokens is not None:
            chunk["usage"] = openai_usage(Usage(prompt_tokens, 0))
        return chunk

    def delta(self, event: Output) -> dict[str, Any]:
        """The chunk of one output event (legacy completions: text only)."""
        if self.chat:
            return self._chunk(
                [
                    {
                        "index": 0,
                        "delta": openai_delta(event),
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        return self._chunk(
            [
                {
                    "index": 0,
                    "text": event.text if isinstance(event, TextDelta) else "",
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )

    def final(self, reason: str, stop_sequence: str | None = None) -> dict[str, Any]:
        """The finishing chunk; ``stop_reason`` names the stop string that matched (vLLM's
        extension), which Anthropic clients need as ``stop_sequence``."""
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": None,
            "finish_reason": reason,
            "stop_reason": stop_sequence,
        }
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return self._chunk([choice])

    def usage(self, finish: Finish) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = usage_of(finish)
        return chunk


def chat_completion(
    model: str, message: dict[str, Any], finish: Finish, *, tool_calls: bool
) -> dict[str, Any]:
    return {
        "id": completion_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(finish, tool_calls=tool_calls),
                "stop_reason": finish.stop_sequence,
            }
        ],
        "usage": usage_of(finish),
    }


def text_completion(model: str, text: str, finish: Finish) -> dict[str, Any]:
    return {
        "id": completion_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason(finish, tool_calls=False),
                "stop_reason": finish.stop_sequence,
            }
        ],
        "usage": usage_of(finish),
    }
