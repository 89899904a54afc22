"""Server-sent events: lines in, (event, data) out. Both wire APIs stream SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field


@dataclass
class SseEvent:
    event: str
    data: str


@dataclass
class SseParser:
    """Feed lines one at a time; a blank line ends an event (the SSE framing rule)."""

    _event: str = ""
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> SseEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._flush()
        if line.startswith(":"):  # a comment / keep-alive
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def _flush(self) -> SseEvent | None:
        if not self._data and not self._event:
            return None
        event = SseEvent(self._event or "message", "\n".join(self._data))
        self._event, self._data = "", []
        return event

    def finish(self) -> SseEvent | None:
        """The last event when the stream ends without a trailing blank line."""
        return self._flush() if self._data else None


def parse_lines(lines: Iterable[str]) -> list[SseEvent]:
    parser = SseParser()
    events = [e for line in lines if (e := parser.feed(line)) is not None]
    if (last := parser.finish()) is not None:
        events.append(last)
    return events


async def aiter_events(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    parser = SseParser()
    async for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
    last = parser.finish()
    if last is not None:
        yield last
