"""The GGUF's own vocabulary behind the tokenizer interface the shared prompt and detokenizer
code expects (``apply_chat_template``, ``encode``, ``decode``), with the model's chat template:
the repo's tokenizer files when they sit beside the GGUF, else the GGUF metadata's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helexa.neuron.harness.llamacpp.binding import Model, Vocab


def chat_template(root: Path, model: Model) -> str | None:
    """The template a user of this repo gets: ``chat_template.jinja``, then
    ``tokenizer_config.json``'s, then the one the GGUF carries."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = root / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            template = None
        if isinstance(template, str) and template:
            return template
    return model.meta("tokenizer.chat_template")


class GgufTokenizer:
    def __init__(self, vocab: Vocab, template: str | None) -> None:
        self._vocab = vocab
        self.chat_template = template
        self.control_texts = vocab.control_texts()
        self._specials: dict[str, str] = {}
        for name, which in (("bos_token", "bos"), ("eos_token", "eos")):
            token = vocab.special_id(which)
            if token is not None:
                self._specials[name] = vocab.piece(token, special=True).decode(
                    "utf-8", errors="replace"
                )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        assert not tokenize, "render, then encode"
        rendered, _indices = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **{**self._specials, **kwargs},
        )
        return rendered[0]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._vocab.tokenize(text, add_special=add_special_tokens)

    def encode_plain(self, text: str) -> list[int]:
        """Client text: control tokens written in it stay text."""
        return self._vocab.tokenize(text, add_special=False, parse_special=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        piece = self._vocab.piece
        data = b"".join(piece(t, special=not skip_special_tokens) for t in ids)
        return data.decode("utf-8", errors="replace")

    def single_token(self, text: str) -> int | None:
        """The id of ``text`` when the vocabulary has it as one token (tags such as <think>)."""
        ids = self._vocab.tokenize(text, add_special=False)
        return ids[0] if len(ids) == 1 else None
