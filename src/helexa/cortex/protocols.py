"""The client protocols cortex speaks, plugged into the one relay (``relay.Endpoint``):
OpenAI chat/legacy completions (passed through), Anthropic Messages and count_tokens, and
the OpenAI Responses API (both translated by pure functions in ``helexa.core``)."""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

import orjson
from starlette.types import Scope

from helexa.core.errors import ApiError, anthropic_body, bad_request
from helexa.core.http import validate
from helexa.core.wire import check_model_name
from helexa.cortex.relay import (
    UNFINISHED,
    UNFINISHED_MESSAGE,
    EventBuffer,
    EventCodec,
    NeuronRequest,
    header,
    neuron_error,
)
from helexa.cortex.translate import anthropic, responses
from helexa.cortex.translate.tool_set import HostedTools

FIRST_TOKEN = re.compile(rb'"(?:content|text|reasoning_content)":"[^"]|"tool_calls":\[')
USAGE_ONLY = re.compile(rb'"choices":\[\]')
SESSION_HEADER = b"x-claude-code-session-id"
ERROR_EVENT = b'data: {"error"'  # how a neuron ends a stream that failed
SSE_DONE = b"data: [DONE]\n\n"


def _model_field(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string", param="model")
    try:  # only routed here: a lookup, never a glob or a path (the neuron checks those)
        return check_model_name(model, client=True)
    except ValueError as exc:
        raise bad_request(f"invalid model name: {exc}", param="model") from None


def _text_key(*values: Any) -> str | None:
    return next((v for v in values if isinstance(v, str) and v), None)


# --- OpenAI chat / legacy completions: passthrough -------------------------------------------


class StreamTap:
    """Watches SSE bytes going by: first-token time, the usage frames (dropped or stripped
    when the client did not ask for usage), without re-encoding anything else."""

    def __init__(self, keep_usage: bool) -> None:
        self.keep_usage = keep_usage
        self.first_token_at: float | None = None
        self.usage: dict[str, Any] | None = None
        self.done = False  # [DONE] went by
        self.error: str | None = None  # the code of an error event that went by
        self._events = EventBuffer()

    def feed(self, chunk: bytes) -> bytes:
        chunk = self._events.feed(chunk)
        if self.first_token_at is None and FIRST_TOKEN.search(chunk):
            self.first_token_at = time.monotonic()
        if b'"usage"' in chunk:
            chunk = self._take_usage(chunk)
        if ERROR_EVENT in chunk:
            self._take_error(chunk)
        # The last whole event (the same text inside a content string does not count).
        if chunk == SSE_DONE or chunk.endswith(b"\n\n" + SSE_DONE):
            self.done = True
        return chunk

    def _take_error(self, chunk: bytes) -> None:
        for event in chunk.split(b"\n\n"):
            if event.startswith(ERROR_EVENT):
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                    self.error = neuron_error(orjson.loads(event[6:]).get("error"))[2]
                self.error = self.error or "upstream_error"

    def flush(self) -> bytes:
        return self._events.flush()

    def _take_usage(self, chunk: bytes) -> bytes:
        kept = []
        for event in chunk.split(b"\n\n"):
            if event.startswith(b"data: {") and b'"usage"' in event:
                with contextlib.suppress(orjson.JSONDecodeError):
                    parsed = orjson.loads(event[6:])
                    if parsed.get("usage"):
                        self.usage = parsed["usage"]
                    if not self.keep_usage:
                        if USAGE_ONLY.search(event):
                            continue
                        # The opening chunk carries the prompt's usage: not asked for.
                        parsed.pop("usage", None)
                        event = b"data: " + orjson.dumps(parsed)
            kept.append(event)
        return b"\n\n".join(kept)


class PassthroughCodec:
    def __init__(self, keep_usage: bool) -> None:
        self.tap = StreamTap(keep_usage)
        self._error: str | None = None

    @property
    def error(self) -> str | None:
        return self._error or self.tap.error

    @property
    def usage(self) -> dict[str, Any] | None:
        return self.tap.usage

    @property
    def complete(self) -> bool:
        return self.tap.done or self.tap.error is not None

    @property
    def first_token_at(self) -> float | None:
        return self.tap.first_token_at

    def opening(self) -> bytes:
        return b""

    def feed(self, events: bytes) -> tuple[bytes, bool]:
        return self.tap.feed(events), False

    def idle(self) -> bytes | None:
        return None  # the neuron sends its own keep-alives; silence past the timeout is death

    def end(self) -> bytes:
        tail = self.tap.flush()
        if self.complete:
            return tail
        return tail + self.fail(502, UNFINISHED_MESSAGE, UNFINISHED)  # never a silent end

    def fail(self, status: int, message: str, code: str) -> bytes:
        self.tap.flush()  # a half-received event cannot be completed: drop it
        self._error = code
        kind = "service_unavailable" if status == 503 else "server_error"
        error = ApiError(status, message, type=kind, code=code)
        return b"data: " + orjson.dumps(error.openai_body()) + b"\n\n"


class ToolPolicy:
    """A translated protocol's rule for tools no model here can call ([compat] hosted_tools)."""

    def __init__(self, hosted_tools: HostedTools = "omit") -> None:
        self.hosted_tools = hosted_tools


class OpenAIErrors:
    """Errors in the OpenAI envelope; a neuron's error answers are already in it."""

    def error_body(self, exc: ApiError) -> bytes:
        return orjson.dumps(exc.openai_body())

    def upstream_error(self, status: int, raw: bytes) -> bytes:
        return raw


class OpenAIPassthrough(OpenAIErrors):
    """/v1/chat/completions and /v1/completions: the body goes on with the model resolved;
    the answer comes back byte for byte."""

    def __init__(self, path: str) -> None:
        self.path = path

    def model_of(self, body: dict[str, Any]) -> str:
        return _model_field(body)

    def translate(self, body: dict[str, Any], model_id: str, scope: Scope) -> NeuronRequest:
        body["model"] = model_id
        if body.get("stream") is not None and not isinstance(body["stream"], bool):  # never guess
            raise bad_request("stream must be true or false", param="stream")
        stream = body.get("stream") is True
        keep_usage = False
        if stream:  # cortex always wants usage for its metrics
            options = body.get("stream_options")
            options = options if isinstance(options, dict) else {}
            keep_usage = options.get("include_usage") is True
            body["stream_options"] = {**options, "include_usage": True}
        affinity = _text_key(
            header(scope, SESSION_HEADER), body.get("prompt_cache_key"), body.get("user")
        )
        return NeuronRequest(self.path, body, stream, affinity, context=keep_usage)

    def whole(
        self, data: dict[str, Any], raw: bytes, request: NeuronRequest, requested: str
    ) -> bytes:
        return raw

    def codec(self, request: NeuronRequest, requested: str) -> PassthroughCodec:
        return PassthroughCodec(keep_usage=bool(request.context))


# --- Anthropic Messages ----------------------------------------------------------------------


class AnthropicErrors:
    def error_body(self, exc: ApiError) -> bytes:
        return orjson.dumps(anthropic_body(exc))

    def upstream_error(self, status: int, raw: bytes) -> bytes:
        return orjson.dumps(anthropic.error_from_openai(status, raw))


def _anthropic_affinity(scope: Scope, metadata: dict[str, Any] | None) -> str | None:
    user = (metadata or {}).get("user_id")
    return _text_key(header(scope, SESSION_HEADER), user if isinstance(user, str) else None)


class AnthropicMessages(AnthropicErrors, ToolPolicy):
    def model_of(self, body: dict[str, Any]) -> str:
        return _model_field(body)

    def translate(self, body: dict[str, Any], model_id: str, scope: Scope) -> NeuronRequest:
        request = validate(anthropic.MessagesRequest, body)
        tools = anthropic.tool_set(request.tools, self.hosted_tools)
        return NeuronRequest(
            "/v1/chat/completions",
            anthropic.to_openai(request, model_id, tools),
            request.stream,
            _anthropic_affinity(scope, request.metadata),
            omitted=tools.omitted,
        )

    def whole(
        self, data: dict[str, Any], raw: bytes, request: NeuronRequest, requested: str
    ) -> bytes:
        return orjson.dumps(anthropic.from_openai(data, requested))

    def codec(self, request: NeuronRequest, requested: str) -> EventCodec:
        translator = anthropic.StreamTranslator(requested)
        return EventCodec(translator, keepalive=translator.ping)


class AnthropicCountTokens(AnthropicErrors, ToolPolicy):
    def model_of(self, body: dict[str, Any]) -> str:
        return _model_field(body)

    def translate(self, body: dict[str, Any], model_id: str, scope: Scope) -> NeuronRequest:
        request = validate(anthropic.CountTokensRequest, body)
        tools = anthropic.tool_set(request.tools, self.hosted_tools)
        return NeuronRequest(
            "/tokenize",
            anthropic.to_tokenize(request, model_id, tools),
            False,
            _anthropic_affinity(scope, None),
            omitted=tools.omitted,
        )

    def whole(
        self, data: dict[str, Any], raw: bytes, request: NeuronRequest, requested: str
    ) -> bytes:
        return orjson.dumps({"input_tokens": int(data["count"])})

    def codec(self, request: NeuronRequest, requested: str) -> EventCodec:
        raise AssertionError("count_tokens never streams")


# --- OpenAI Responses ------------------------------------------------------------------------


class OpenAIResponses(OpenAIErrors, ToolPolicy):
    def model_of(self, body: dict[str, Any]) -> str:
        return _model_field(body)

    def translate(self, body: dict[str, Any], model_id: str, scope: Scope) -> NeuronRequest:
        request = validate(responses.ResponsesRequest, body)
        tools = responses.tool_set(request.tools, self.hosted_tools)
        return NeuronRequest(
            "/v1/chat/completions",
            responses.to_openai(request, model_id, tools),
            bool(request.stream),
            _text_key(header(scope, SESSION_HEADER), request.prompt_cache_key, request.user),
            context=(request, tools),
            omitted=tools.omitted,
        )

    def whole(
        self, data: dict[str, Any], raw: bytes, request: NeuronRequest, requested: str
    ) -> bytes:
        asked, tools = request.context
        return orjson.dumps(responses.from_openai(data, requested, asked, tools))

    def codec(self, request: NeuronRequest, requested: str) -> EventCodec:
        asked, tools = request.context
        translator = responses.StreamTranslator(requested, asked, tools)
        return EventCodec(translator, opening=translator.start())
