"""One inference request end to end: sampling, admission, generation, response shaping."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

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
from helexa.core.stream import openai_message
from helexa.core.wire import ChatCompletionRequest, CompletionRequest
from helexa.neuron.admission import Admission, Place, Withdrawn
from helexa.neuron.device_thread import WorkerPoisoned
from helexa.neuron.harness.base import (
    EngineCrashed,
    Finish,
    Harness,
    ModelGone,
    PreparedPrompt,
    TokenStream,
)
from helexa.neuron.openai_format import (
    ChunkFactory,
    chat_completion,
    finish_reason,
    text_completion,
)
from helexa.neuron.output_parser import OutputParser, PlainText, TaggedOutput
from helexa.neuron.requests import Running
from helexa.neuron.sampling import resolve_sampling
from helexa.neuron.worker.supervisor import crashed

log = logging.getLogger("helexa.neuron.inference")


def generation_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, WorkerPoisoned):
        return unavailable(str(exc), code="device_poisoned", retry_after=30)
    if isinstance(exc, ModelGone):
        return unavailable(str(exc), code="model_unloaded")
    if isinstance(exc, EngineCrashed):
        return crashed(str(exc))
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


def unstarted(prompt: PreparedPrompt) -> Finish:
    """The end of a request cancelled before it had a slot: nothing generated."""
    return Finish(reason="cancelled", prompt_tokens=len(prompt.token_ids), completion_tokens=0)


async def respond(
    *,
    harness: Harness,
    gate: Admission,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: PreparedPrompt,
    keepalive_s: float,
    receive: Receive,
    running: Running,
) -> ASGIApp:
    """Answer one request. A client that leaves while queued or while a non-streaming
    answer is generated stops the work (streams are watched by EventStreamResponse); a
    cancel by request id (``running``) stops it too, and the answer then ends as usual with
    what was generated. Either way the access log gets the exact token count."""
    chat = isinstance(body, ChatCompletionRequest)
    running.record.prompt_tokens = len(prompt.token_ids)
    running.record.completion_tokens = 0  # until a generation starts
    params = resolve_sampling(
        body,
        token_limit=body.token_limit(),
        generation_defaults=prompt.generation_defaults,
        eos_ids=prompt.eos_ids,
        context_length=prompt.context_length,
        prompt_tokens=len(prompt.token_ids),
    )
    if params.response_format is not None:  # a bad schema is a 400 before anything starts
        try:
            prepared = await harness.prepare_format(body.model, params.response_format, prompt)
        except Exception as exc:  # a bad schema is already its 400; a reload is a 503
            raise generation_error(exc) from exc
        params = dataclasses.replace(params, prepared_format=prepared)
    place = gate.join()  # 503 now when draining or the queue is full
    if place is not None:
        running.queued(lambda: gate.withdraw(place))

    def start() -> TokenStream:
        """Generate on the slot just taken (released again if the start fails)."""
        try:
            stream = harness.generate(body.model, prompt, params)
        except Exception as exc:
            gate.release()
            raise generation_error(exc) from exc
        gate.hold(stream)  # the drain deadline may end it (503 / an error event)
        running.started(stream)
        running.record.completion_tokens = None  # known once it ends
        return stream

    parser = parser_for(body, prompt)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = ChunkFactory(body.model, chat=chat)
        # The opening (role) chunk, with the prompt's usage when asked, goes first, before
        # any wait: a translator's opening (Anthropic message_start) has the real count.
        usage = len(prompt.token_ids) if include_usage else None
        opening = sse_data(chunks.role(usage)) if chat else b""  # legacy: no role chunk

        def events(stream: TokenStream, first: bytes = b"") -> AsyncIterator[bytes]:
            return stream_body(stream, chunks, parser, include_usage, keepalive_s, running, first)

        if place is not None:  # headers and keep-alives now: waiting is not silence
            queued = QueuedStream(
                gate,
                place,
                start,
                events,
                lambda: stream_end(chunks, parser, unstarted(prompt), include_usage),
                keepalive_s,
                running,
                body.model,
            )
            return Accounted(
                EventStreamResponse(
                    queued.body(opening),
                    on_close=queued.close,
                    on_disconnect=queued.cancel,
                ),
                running,
            )
        stream = start()

        def close() -> None:
            stream.cancel()
            gate.drop(stream)
            gate.release()

        def left() -> None:
            running.left()
            stream.cancel()

        return Accounted(
            EventStreamResponse(events(stream, opening), on_close=close, on_disconnect=left),
            running,
        )

    try:
        return await respond_whole(body, prompt, parser, gate, place, start, receive, running)
    finally:
        running.end()


async def respond_whole(
    body: ChatCompletionRequest | CompletionRequest,
    prompt: PreparedPrompt,
    parser: OutputParser,
    gate: Admission,
    place: Place | None,
    start: Callable[[], TokenStream],
    receive: Receive,
    running: Running,
) -> Response:
    """The non-streaming answer: waits for its slot and generates while watching for the
    client leaving (499, the generation cancelled and its tokens counted)."""
    if place is not None:
        try:
            await unless_disconnected(gate.wait(place), receive)
        except ClientGone:
            running.left()
            log.info("client left while queued", extra={"model": body.model})
            return Response(status_code=499)
        except Withdrawn:  # cancelled by id while queued: an empty answer, as usual
            return whole_answer(body, parser, "", unstarted(prompt))
    stream = start()

    async def collect() -> list[str]:
        pieces: list[str] = []
        async for batch in stream:
            pieces.extend(batch)
        return pieces

    try:
        pieces = await unless_disconnected(collect(), receive)
    except ClientGone:
        running.left()
        pieces = None
    except Exception as exc:
        raise generation_error(exc) from exc
    finally:
        stream.cancel()
        gate.drop(stream)
        gate.release()
        await running.settle()  # at once when it finished; else its cancel is waited for
    if pieces is None:
        log.info("client left; generation cancelled", extra={"model": body.model})
        return Response(status_code=499)
    assert stream.finish is not None
    return whole_answer(body, parser, "".join(pieces), stream.finish)


def whole_answer(
    body: ChatCompletionRequest | CompletionRequest, parser: OutputParser, text: str, finish: Finish
) -> JSONResponse:
    if isinstance(body, ChatCompletionRequest):
        message = openai_message([*parser.feed(text), *parser.finish()])
        return JSONResponse(
            chat_completion(body.model, message, finish, tool_calls=parser.saw_tool_calls)
        )
    return JSONResponse(text_completion(body.model, text, finish))


class Accounted:
    """A streamed answer that, once over, puts its token count in the access log's
    record — waiting (bounded) for a generation the client abandoned or a drain cut to
    stop, so the count is exact — and leaves the registry of cancellable requests."""

    def __init__(self, response: EventStreamResponse, running: Running) -> None:
        self.response = response
        self.running = running

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.running.end()
            await self.running.settle()


class QueuedStream:
    """A stream that had to queue for a slot: its headers go out at once and an SSE
    keep-alive every ``keepalive_s`` while it waits (as while a prompt prefills), so a
    gateway's idle timeout sees a live stream, not a silent neuron. A wait that ends in a
    503 (queue timeout, drain) ends the stream with that error event, before any chunk; a
    cancel by request id while it waits ends it as an empty answer (``unstarted``)."""

    def __init__(
        self,
        gate: Admission,
        place: Place,
        start: Callable[[], TokenStream],
        events: Callable[[TokenStream], AsyncIterator[bytes]],
        unstarted: Callable[[], bytes],
        keepalive_s: float,
        running: Running,
        model: str,
    ) -> None:
        self.gate = gate
        self.place = place
        self.start = start
        self.events = events
        self.unstarted = unstarted
        self.keepalive_s = keepalive_s
        self.running = running
        self.model = model
        self.stream: TokenStream | None = None

    async def body(self, opening: bytes) -> AsyncIterator[bytes]:
        if opening:
            yield opening
        try:
            while not await self.gate.wait(self.place, self.keepalive_s):
                yield SSE_KEEPALIVE
            self.stream = self.start()
        except Withdrawn:
            yield self.unstarted()
            return
        except ApiError as error:
            log.info("queued stream refused", extra={"model": self.model, "code": error.code})
            self.running.failed(error.code)
            yield sse_data(error.openai_body())
            return
        async for chunk in self.events(self.stream):
            yield chunk

    def cancel(self) -> None:
        """The client left."""
        self.running.left()
        if self.stream is not None:
            self.stream.cancel()

    def close(self) -> None:
        """The response is over (or never started): free the slot, or the queue place."""
        if self.stream is None:
            self.gate.leave(self.place)  # still queued; a no-op once admitted or turned away
            return
        self.stream.cancel()
        self.gate.drop(self.stream)
        self.gate.release()


def stream_end(
    chunks: ChunkFactory, parser: OutputParser, finish: Finish, include_usage: bool
) -> bytes:
    """The last chunks of a stream that ended as usual (a cancel by id included): what the
    parser held back, the finish reason, the usage when asked, ``[DONE]``."""
    tail = [sse_data(chunks.delta(event)) for event in parser.finish()]
    reason = finish_reason(finish, tool_calls=parser.saw_tool_calls)
    tail.append(sse_data(chunks.final(reason, finish.stop_sequence)))
    if include_usage:
        tail.append(sse_data(chunks.usage(finish)))
    tail.append(SSE_DONE)
    return b"".join(tail)


async def stream_body(
    stream: TokenStream,
    chunks: ChunkFactory,
    parser: OutputParser,
    include_usage: bool,
    keepalive_s: float,
    running: Running,
    opening: bytes = b"",
) -> AsyncIterator[bytes]:
    """``opening`` (the role chunk, unless already sent), the stream's chunks, its end."""
    started = time.monotonic()
    if opening:
        yield opening
    try:
        while stream.finish is None:
            pieces = await stream.next_batch(keepalive_s)
            if pieces is None:
                yield SSE_KEEPALIVE
                continue
            if pieces:
                frames = [sse_data(chunks.delta(e)) for e in parser.feed("".join(pieces))]
                if frames:
                    yield b"".join(frames)
    except Exception as exc:
        error = generation_error(exc)
        log.warning(
            "generation failed mid-stream", extra={"model": chunks.model, "error": error.message}
        )
        running.failed(error.code)
        yield sse_data(error.openai_body())
        return
    finish = stream.finish
    yield stream_end(chunks, parser, finish, include_usage)
    elapsed = time.monotonic() - started
    log.debug(
        "stream done",
        extra={
            "model": chunks.model,
            "tokens": finish.completion_tokens,
            "secs": round(elapsed, 3),
        },
    )
