"""Token ids → text deltas that never split a UTF-8 code point, with stop strings held back."""

from __future__ import annotations

from typing import Protocol

MAX_HELD_TOKENS = 4


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Emits only text whose bytes are complete.

    Byte-level BPE tokens can end inside a multi-byte character; the decoder then
    renders U+FFFD. Text is released once the tail decodes cleanly; only a short
    window of ids is re-decoded each step, so the cost per token stays constant.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        *,
        prompt_tail: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # A few prompt ids give the decoder left context (SentencePiece drops a leading
        # space when a decode starts mid-sequence); they are never emitted.
        self._ids: list[int] = list(prompt_tail or [])
        self._prefix_start = 0  # window start: ids before it are fully emitted
        self._emitted_start = len(self._ids)  # ids from here on have not been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        window = self._ids[self._prefix_start :]
        prefix_text = self._tok.decode(
            self._ids[self._prefix_start : self._emitted_start], skip_special_tokens=self._skip
        )
        full_text = self._tok.decode(window, skip_special_tokens=self._skip)
        pending = len(self._ids) - self._emitted_start
        # A code point spans at most 4 byte tokens: past that the bytes are simply invalid
        # and holding them back would stall the stream forever.
        if (full_text.endswith("\ufffd") and pending < MAX_HELD_TOKENS) or len(full_text) <= len(
            prefix_text
        ):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_start = self._emitted_start
        self._emitted_start = len(self._ids)
        return delta

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character renders as U+FFFD)."""
        prefix_text = self._tok.decode(
            self._ids[self._prefix_start : self._emitted_start], skip_special_tokens=self._skip
        )
        full_text = self._tok.decode(
            self._ids[self._prefix_start :], skip_special_tokens=self._skip
        )
        self._prefix_start = self._emitted_start = len(self._ids)
        return full_text[len(prefix_text) :]


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that may start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Text safe to emit now; sets ``matched`` when a stop string completes."""
        if not self._stops:
            return text
        buffer = self._held + text
        hits = [(buffer.find(s), s) for s in self._stops if s in buffer]
        if hits:
            index, stop = min(hits)
            self.matched = stop
            self._held = ""
            return buffer[:index]
        keep = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:size]):
                    keep = max(keep, size)
                    break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def flush_held(detok: IncrementalDetokenizer, stops: StopMatcher) -> str:
    """The text held back when a generation ends: the detokenizer's tail, then any partial
    stop string (unless the tail completed one; ``stops.matched`` says which)."""
    tail = stops.push(detok.flush())
    if stops.matched is None:
        tail += stops.flush()
    return tail
