"""Client text never becomes control tokens: while a chat template renders, client strings
that spell a control token (``<|im_start|>``, ``<|endoftext|>``) are wrapped in marks, and the
rendered prompt is tokenized piece by piece: the template's markup with its control tokens,
the client's text as plain text."""

from __future__ import annotations

import copy
import functools
import re
import secrets
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from helexa.core.errors import bad_request

_control_cache: weakref.WeakKeyDictionary[Any, tuple[str, ...]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Marks:
    """What client text that spells a control token is wrapped in while the template renders,
    so the rendered prompt shows where it lies: private-use code points around a random
    nonce, new for each prompt, so no client text can close or open a mark of its own."""

    open: str
    close: str

    @classmethod
    def new(cls) -> Marks:
        nonce = secrets.token_hex(8)
        return cls(f"\ue000{nonce}\ue000", f"\ue001{nonce}\ue001")

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(f"{re.escape(self.open)}(.*?){re.escape(self.close)}", re.DOTALL)


def control_texts(tokenizer: Any) -> tuple[str, ...]:
    """How the tokenizer's control tokens are written (``<|im_start|>``, ``<|endoftext|>``):
    a GGUF vocabulary lists them itself; for transformers, its special added tokens."""
    own = getattr(tokenizer, "control_texts", None)
    if own is not None:
        return tuple(own)
    cached = _control_cache.get(tokenizer)
    if cached is None:
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        cached = tuple(sorted({t.content for t in decoder.values() if t.special and t.content}))
        _control_cache[tokenizer] = cached
    return cached


_plain_copies: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_plain_lock = threading.Lock()


def _plain_copy(tokenizer: Any) -> Any:
    """A copy of a transformers tokenizer that always splits special tokens. Asking the
    tokenizer itself (``split_special_tokens=True``) flips a flag on its shared backend that
    every other thread's encode reads: a concurrent request could parse client text as
    control tokens, or split the template's markup."""
    with _plain_lock:
        plain = _plain_copies.get(tokenizer)
        if plain is None:
            plain = copy.deepcopy(tokenizer)
            plain.split_special_tokens = True
            plain.backend_tokenizer.encode_special_tokens = True
            _plain_copies[tokenizer] = plain
    return plain


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """``text`` as plain text: a control token written in it is not that token."""
    own = getattr(tokenizer, "encode_plain", None)
    if own is not None:
        return own(text)
    return _plain_copy(tokenizer).encode(text, add_special_tokens=False)


@functools.lru_cache(maxsize=16)
def _spelling_any(controls: tuple[str, ...]) -> re.Pattern[str]:
    """One scan finds any of a vocabulary's control tokens (some have hundreds)."""
    return re.compile("|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)))


def guard(value: Any, controls: tuple[str, ...], marks: Marks) -> tuple[Any, bool]:
    """``value`` with every string (keys too) that spells a control token wrapped in
    ``marks``; whether any was."""
    if isinstance(value, str):
        if _spelling_any(controls).search(value):
            return f"{marks.open}{value}{marks.close}", True
        return value, False
    if isinstance(value, dict):
        pairs = [(guard(k, controls, marks), guard(v, controls, marks)) for k, v in value.items()]
        guarded = {k: v for (k, _), (v, _) in pairs}
        return guarded, any(a or b for (_, a), (_, b) in pairs)
    if isinstance(value, list):
        items = [guard(v, controls, marks) for v in value]
        return [v for v, _ in items], any(hit for _, hit in items)
    return value, False


def tokenize_guarded(tokenizer: Any, text: str, marks: Marks) -> tuple[str, list[int]]:
    """A prompt rendered from wrapped client text: the template's markup tokenized with its
    control tokens, the client's text as plain text. A template that cut a mark apart (or
    dropped one end of it) leaves client text unmarked: refused, never guessed at."""
    pieces = marks.pattern.split(text)  # markup, client, markup, client, ..., markup
    markup = pieces[0::2]
    if any("\ue000" in m or "\ue001" in m for m in markup):
        raise bad_request(
            "the chat template cut apart a message that contains control-token text "
            "(such as <|im_start|>); it cannot be rendered safely",
            param="messages",
            code="control_tokens_in_text",
        )
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if not piece:
            continue
        if index % 2:
            ids += encode_plain(tokenizer, piece)
        else:
            ids += tokenizer.encode(piece, add_special_tokens=False)
    return "".join(pieces), ids
