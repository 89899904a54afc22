"""One inference request end to end: sampling, admission, generation, response shaping."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive

from helexa.core.errors import ApiError, internal, unavailable
from helexa.core.http import (
    SSE_DONE,
    SSE_KEEPALIVE,
    ClientGone,
    EventStreamResponse,
    JSONResponse,
    sse_data,
    unless_disconnected,
)
from helexa.core.wire import ChatCompletionRequest, CompletionRequest
from helexa.neuron.admission import Admission
from helexa.neuron.harness.base import Harness, ModelGone, PreparedPrompt, TokenStream
from helexa.neuron.openai_format import (
    ChunkFactory,
    chat_completion,
    finish_reason,
    text_completion,
)
from helexa.neuron.output_parser import OutputParser, PlainText, TaggedOutput, merge_deltas
from helexa.neuron.sampling import resolve_sampling
from helexa.neuron.workers import WorkerPoisoned

log = logging.getLogger("helexa.neuron.inference")


def generation_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, WorkerPoisoned):
        return unavailable(str(exc), code="device_poisoned", retry_after=30)
    if isinstance(exc, ModelGone):
        return unavailable(str(exc), code="model_unloaded")
    return internal(f"generation failed: {type(exc).__name__}: {exc}", code="generation_failed")


def parser_for(
    request: ChatCompletionRequest | CompletionRequest, prompt: PreparedPrompt
) -> OutputParser:
    """Tagged output for chat with models that write <think>/<tool_call>; raw text else."""
    if not isinstance(request, ChatCompletionRequest):
        return PlainText()
    tools = prompt.tool_call_tags and bool(request.tools) and request.tool_choice != "none"
    if not (prompt.reasoning_tags or tools):
        return PlainText()
    return TaggedOutput(
        reasoning=prompt.reasoning_tags, tools=tools, in_reasoning=prompt.opens_reasoning
    )


async def respond(
    *,
    harness: Harness,
    gate: Admission,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: PreparedPrompt,
    keepalive_s: float,
    receive: Receive,
) -> Response:
    """Answer one request. A client that leaves while queued or while a non-streaming
    answer is generated stops the work (streams are watched by EventStreamResponse)."""
    chat = isinstance(body, ChatCompletionRequest)
    params = resolve_sampling(
        body,
        token_limit=body.token_limit(),
        generation_defaults=prompt.generation_defaults,
        eos_ids=prompt.eos_ids,
        context_length=prompt.context_length,
        prompt_tokens=len(prompt.token_ids),
    )
    if params.response_format is not None:  # a bad schema is a 400 before anything starts
        prepared = await harness.prepare_format(body.model, params.response_format, prompt)
        params = dataclasses.replace(params, prepared_format=prepared)
    try:
        await unless_disconnected(gate.acquire(), receive)
    except ClientGone:
        log.info("client left while queued", extra={"model": body.model})
        return Response(status_code=499)
    try:
        stream = harness.generate(body.model, prompt, params)
    except Exception as exc:
        gate.release()
        raise generation_error(exc) from exc
    gate.hold(stream)  # the drain deadline may end it (503 / an error event: shutting_down)
    parser = parser_for(body, prompt)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def close() -> None:
            stream.cancel()
            gate.drop(stream)
            gate.release()

        return EventStreamResponse(
            stream_body(
                stream,
                ChunkFactory(body.model, chat=chat),
                parser,
                include_usage,
                keepalive_s,
                prompt_tokens=len(prompt.token_ids),
            ),
            on_close=close,
            on_disconnect=stream.cancel,
        )

    async def collect() -> list[str]:
        pieces: list[str] = []
        async for batch in stream:
            pieces.extend(batch)
        return pieces

    try:
        pieces = await unless_disconnected(collect(), receive)
    except ClientGone:
        log.info("client left; generation cancelled", extra={"model": body.model})
        return Response(status_code=499)
    except Exception as exc:
        raise generation_error(exc) from exc
    finally:
        stream.cancel()
        gate.drop(stream)
        gate.release()
    assert stream.finish is not None
    text = "".join(pieces)
    if chat:
        message = merge_deltas([*parser.feed(text), *parser.finish()])
        return JSONResponse(
            chat_completion(body.model, message, stream.finish, tool_calls=parser.saw_tool_calls)
        )
    return JSONResponse(text_completion(body.model, text, stream.finish))


async def stream_body(
    stream: TokenStream,
    chunks: ChunkFactory,
    parser: OutputParser,
    include_usage: bool,
    keepalive_s: float,
    *,
    prompt_tokens: int,
) -> AsyncIterator[bytes]:
    started = time.monotonic()
    if chunks.chat:
        yield sse_data(chunks.role(prompt_tokens if include_usage else None))
    try:
        while stream.finish is None:
            pieces = await stream.next_batch(keepalive_s)
            if pieces is None:
                yield SSE_KEEPALIVE
                continue
            if pieces:
                frames = [sse_data(chunks.delta(d)) for d in parser.feed("".join(pieces))]
                if frames:
                    yield b"".join(frames)
    except Exception as exc:
        error = generation_error(exc)
        log.warning(
            "generation failed mid-stream", extra={"model": chunks.model, "error": error.message}
        )
        yield sse_data(error.openai_body())
        return
    finish = stream.finish
    tail = [sse_data(chunks.delta(d)) for d in parser.finish()]
    reason = finish_reason(finish, tool_calls=parser.saw_tool_calls)
    tail.append(sse_data(chunks.final(reason, finish.stop_sequence)))
    if include_usage:
        tail.append(sse_data(chunks.usage(finish)))
    tail.append(SSE_DONE)
    yield b"".join(tail)
    elapsed = time.monotonic() - started
    log.debug(
        "stream done",
        extra={
            "model": chunks.model,
            "tokens": finish.completion_tokens,
            "secs": round(elapsed, 3),
        },
    )
