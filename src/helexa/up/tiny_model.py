"""A tiny, real Qwen3-architecture causal LM, built offline for tests and demos.

Everything here is generated locally and deterministically (fixed seeds), in well under a second:

* a byte-level BPE tokenizer (~512 ids) trained with `tokenizers` on a small built-in English
  corpus, with Qwen3's special tokens and a Qwen3-style chat template (tools, tool calls,
  ``enable_thinking``);
* random-init weights in the Qwen3 layout (``Qwen3ForCausalLM``), saved as ``model.safetensors``;
* optionally the same model as GGUF files (``Q8_0`` and ``F16``) with llama.cpp tensor names and
  tokenizer metadata.

`write_tiny_model` writes a plain model directory. `write_tiny_model_to_hf_cache` lays the same
files out the way ``huggingface_hub`` caches a download (blobs, snapshot symlinks, ``refs/main``),
so code that resolves ``helexa/tiny-qwen3`` through the hub cache works with
``HF_HUB_OFFLINE=1``.

Attention heads are 128 wide, as in every Qwen3 checkpoint, rather than ``hidden_size / heads``:
transformers builds the config of a qwen3 GGUF without reading ``attention.key_length`` and so
assumes Qwen3's default ``head_dim`` of 128. Any other width would load from safetensors but not
from the GGUF.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEMO_SHAPE",
    "GGUF_F16_FILENAME",
    "GGUF_Q8_0_FILENAME",
    "SPECIAL_TOKENS",
    "TINY_REPO_ID",
    "TinyModelSpec",
    "build_tokenizer_dir",
    "write_tiny_model",
    "write_tiny_model_to_hf_cache",
]

TINY_REPO_ID = "helexa/tiny-qwen3"
# What `cortex up --tiny` serves: a context that holds Claude Code's whole prompt (its
# system prompt and tools are ~54 k tokens with this small vocabulary), one layer and one
# head so that reading it takes seconds on a CPU, and answers a few dozen tokens long.
DEMO_SHAPE: dict[str, Any] = {
    "max_position_embeddings": 131072,
    "num_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "eos_bias": 0.14,
}
GGUF_Q8_0_FILENAME = "tiny-qwen3-Q8_0.gguf"
GGUF_F16_FILENAME = "tiny-qwen3-F16.gguf"

# Bump whenever the bytes written change: it feeds the commit hash of the cached snapshot.
_FORMAT_VERSION = 1

# (content, special), in id order after the learned vocabulary. As in Qwen3, only the first three
# are special (dropped by ``skip_special_tokens``); the rest are plain added tokens matched whole.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
_ENDOFTEXT, _IM_START, _IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2/Qwen3's pre-tokenizer split (also what llama.cpp calls the "qwen2" pre-tokenizer).
_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BASE_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_GGUF_FILES = (GGUF_Q8_0_FILENAME, GGUF_F16_FILENAME)
_LFS_SUFFIXES = (".safetensors", ".gguf")

# Qwen3's chat template (the revision that tolerates non-string content).
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \
\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and \
not(message.content.startswith('<tool_response>') and \
message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = \
content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + \
reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Training text for the tokenizer. Kept free of the special-token strings so that none of them is
# learned as an ordinary token.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still be a real model: it has a
tokenizer, a configuration, and weights, and it answers every question with the same confidence,
whether or not it knows anything at all.

Once upon a time, in a quiet town by the sea, there lived an old clockmaker who repaired watches
for the fishermen. Every morning he opened his shop at seven, made a pot of tea, and listened to
the gulls while the tide came in. Children would stop by the window to watch the gears turning.

The weather today is sunny with a few clouds in the afternoon. Temperatures will reach twenty
three degrees, with a light wind from the west. Tomorrow there is a chance of rain in the
morning, clearing by the evening. Please remember to bring an umbrella if you are going out.

You are a helpful assistant. When the user asks a question, think about what they need, then
answer clearly and briefly. If a tool would help, call the tool with the right arguments and wait
for the result before you reply. Do not make up facts; say so when you are not sure.

What is the capital of France? The capital of France is Paris. What time is it in Tokyo? Let me
check the current time for you. How many people live in London? About nine million people live
in Greater London. Can you book a table for two at eight o'clock tonight? Of course I can.

def get_weather(city: str, unit: str = "celsius") -> dict:
    return {"city": city, "temperature": 23, "unit": unit, "forecast": ["sunny", "cloudy"]}

{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "description": "Search the web for a query",
"parameters": {"type": "object", "properties": {"query": {"type": "string"}},
"required": ["query"]}}}

Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024-01-31 12:30 3.14159 42 -7 +1 50% $19.99
Servers stream tokens to clients over HTTP. Each request carries a model name, a list of
messages, and options such as temperature, top p, top k, and the maximum number of new tokens.
The gateway routes the request to a worker with a free GPU, which loads the model, runs the
forward pass, samples the next token, and sends it back until it reaches a stop token.
"""


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape of the tiny model; everything else is fixed."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    max_position_embeddings: int = 2048
    seed: int = 0
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    # > 0: answers end after a few dozen tokens instead of running to max_tokens (demo).
    eos_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size must be > {256 + len(SPECIAL_TOKENS)} for byte-level BPE")
        for name in ("hidden_size", "num_layers", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def intermediate_size(self) -> int:
        return 3 * self.hidden_size


_SHAPE_ARGS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_layers",
        "max_position_embeddings",
        "seed",
        "num_attention_heads",
        "num_key_value_heads",
        "eos_bias",
    }
)


def _spec(**kwargs: Any) -> TinyModelSpec:
    unknown = sorted(set(kwargs) - _SHAPE_ARGS)
    if unknown:
        raise TypeError(f"unexpected arguments: {', '.join(unknown)}")
    return TinyModelSpec(**kwargs)


# --------------------------------------------------------------------------------------------
# tokenizer


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    """The trained tokenizer, serialized. Cached: the training is deterministic."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    learned = vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=learned,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    size = tokenizer.get_vocab_size()
    if size != learned:
        raise ValueError(
            f"the built-in corpus yields only {size + len(SPECIAL_TOKENS)} tokens; "
            f"vocab_size={vocab_size} is too large"
        )
    for content, special in SPECIAL_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    for offset, (content, _) in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(content) != learned + offset:
            raise AssertionError(f"{content} did not get the expected id")
    return tokenizer.to_str()


def _token_id(vocab_size: int, content: str) -> int:
    """The id of a special token: they sit, in order, after the learned vocabulary."""
    names = [name for name, _ in SPECIAL_TOKENS]
    return vocab_size - len(SPECIAL_TOKENS) + names.index(content)


def _tokenizer_config() -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {},  # filled in by _write_tokenizer, which knows the ids
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": _IM_END,
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": 131072,
        "pad_token": _ENDOFTEXT,
        "split_special_tokens": False,
        # Not Qwen2Tokenizer: transformers 5 rebuilds that class from vocab and merges with an
        # NFC normalizer, so decomposed text would not round-trip. This loads tokenizer.json as is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def _write_tokenizer(dest: Path, vocab_size: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(_tokenizer_json(vocab_size), encoding="utf-8")
    config = _tokenizer_config()
    config["added_tokens_decoder"] = {
        str(_token_id(vocab_size, content)): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in SPECIAL_TOKENS
    }
    _write_json(dest / "tokenizer_config.json", config)


def build_tokenizer_dir(dest: Path, *, vocab_size: int = 512) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) to dest."""
    _write_tokenizer(Path(dest), vocab_size)


# --------------------------------------------------------------------------------------------
# model


def _model_config(spec: TinyModelSpec) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": _token_id(spec.vocab_size, _ENDOFTEXT),
        "eos_token_id": _token_id(spec.vocab_size, _IM_END),
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.num_layers,
        "model_type": "qwen3",
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": spec.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": spec.vocab_size,
    }


def _generation_config(spec: TinyModelSpec) -> dict[str, Any]:
    endoftext = _token_id(spec.vocab_size, _ENDOFTEXT)
    return {
        "bos_token_id": endoftext,
        "do_sample": True,
        "eos_token_id": [_token_id(spec.vocab_size, _IM_END), endoftext],
        "pad_token_id": endoftext,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
    }


def _weights(spec: TinyModelSpec) -> dict[str, np.ndarray]:
    """Random-init fp32 weights under transformers' Qwen3 names (embeddings tied, no lm_head)."""
    rng = np.random.default_rng(spec.seed)
    h, q = spec.hidden_size, spec.num_attention_heads * spec.head_dim
    kv, ff = spec.num_key_value_heads * spec.head_dim, spec.intermediate_size

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    embed = normal(spec.vocab_size, h)
    if spec.eos_bias:
        # Every token embedding shares a constant in dimension 0, so the final hidden
        # state has a steady positive component there; the end-of-turn token's (tied)
        # row gets a larger one and so a logit boost at every step, whatever the context.
        embed[:, 0] = np.float32(0.1)
        embed[_token_id(spec.vocab_size, _IM_END), 0] = np.float32(0.1 + spec.eos_bias)
    tensors = {"model.embed_tokens.weight": embed}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": ones(h),
            p + "self_attn.q_proj.weight": normal(q, h),
            p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, q),
            p + "self_attn.q_norm.weight": ones(spec.head_dim),
            p + "self_attn.k_norm.weight": ones(spec.head_dim),
            p + "post_attention_layernorm.weight": ones(h),
            p + "mlp.gate_proj.weight": normal(ff, h),
            p + "mlp.up_proj.weight": normal(ff, h),
            p + "mlp.down_proj.weight": normal(h, ff),
        }
    tensors["model.norm.weight"] = ones(h)
    return tensors


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_model(
    dest: Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a loadable Hugging Face model directory for a tiny random Qwen3 and return it.

    Files: ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32),
    ``tokenizer.json`` and ``tokenizer_config.json``. The same arguments give the same bytes.
    """
    spec = _spec(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
    )
    dest = Path(dest)
    _write_model_dir(dest, spec)
    return dest


def _write_model_dir(dest: Path, spec: TinyModelSpec) -> None:
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    _write_json(dest / "config.json", _model_config(spec))
    _write_json(dest / "generation_config.json", _generation_config(spec))
    save_file(_weights(spec), str(dest / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(dest, spec.vocab_size)


# --------------------------------------------------------------------------------------------
# GGUF


def _write_gguf(path: Path, spec: TinyModelSpec, *, quantize: bool) -> None:
    """The model as llama.cpp would convert it: Q8_0 (or F16) matrices, F32 norms."""
    import gguf

    qtype = gguf.GGMLQuantizationType.Q8_0 if quantize else gguf.GGMLQuantizationType.F16
    if quantize and spec.hidden_size % 32:
        raise ValueError("Q8_0 needs hidden_size to be a multiple of 32")
    tokenizer = json.loads(_tokenizer_json(spec.vocab_size))
    learned: dict[str, int] = tokenizer["model"]["vocab"]
    tokens = sorted(learned, key=learned.__getitem__) + [name for name, _ in SPECIAL_TOKENS]
    token_types = [int(gguf.TokenType.NORMAL)] * len(learned) + [
        int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        for _, special in SPECIAL_TOKENS
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), arch="qwen3")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("Tiny Qwen3")
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.MOSTLY_F16
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_attention_heads)
    writer.add_head_count_kv(spec.num_key_value_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(_token_id(spec.vocab_size, _ENDOFTEXT))
    writer.add_eos_token_id(_token_id(spec.vocab_size, _IM_END))
    writer.add_pad_token_id(_token_id(spec.vocab_size, _ENDOFTEXT))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, spec.num_layers)
    for hf_name, array in _weights(spec).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AssertionError(f"no GGUF name for {hf_name}")
        if array.ndim == 1:
            writer.add_tensor(name, array)
        elif quantize:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array.astype(np.float16))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------------------------
# Hugging Face hub cache


def _repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def _commit_hash(repo_id: str, spec: TinyModelSpec, *, gguf_only: bool) -> str:
    """A stable, fake 40-hex commit for this repo id and model shape."""
    key = json.dumps(
        {"format": _FORMAT_VERSION, "repo_id": repo_id, "gguf_only": gguf_only, **asdict(spec)},
        sort_keys=True,
    )
    return hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()


def _blob_name(path: Path) -> str:
    """What huggingface_hub names a blob: the sha256 for LFS files, the git blob sha1 otherwise."""
    data = path.read_bytes()
    if path.name.endswith(_LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    header = f"blob {len(data)}\0".encode()
    return hashlib.sha1(header + data, usedforsecurity=False).hexdigest()


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _link_into_snapshot(source: Path, repo: Path, snapshot: Path) -> None:
    """Move a built file into blobs/ and point the snapshot at it, as huggingface_hub does."""
    blob = repo / "blobs" / _blob_name(source)
    blob.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, blob)  # same content under the same name: replacing is harmless
    target = snapshot / source.name
    tmp = snapshot / f".{source.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        tmp.symlink_to(os.path.relpath(blob, snapshot))
    except OSError:  # no symlinks (e.g. Windows without developer mode): copy, like the hub
        shutil.copyfile(blob, tmp)
    os.replace(tmp, target)


def _missing(snapshot: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not (snapshot / name).is_file()]


@contextlib.contextmanager
def _build_dir(repo: Path) -> Iterator[Path]:
    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=repo, prefix=".build-") as tmp:
        yield Path(tmp)


def write_tiny_model_to_hf_cache(
    cache_dir: Path,
    repo_id: str = TINY_REPO_ID,
    *,
    with_gguf: bool = False,
    gguf_only: bool = False,
    **kwargs: Any,
) -> Path:
    """Put the tiny model into a Hugging Face hub cache as if downloaded; return the snapshot dir.

    ``huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True)``
    then resolves to the returned directory, and transformers loads ``repo_id`` from the cache
    with ``HF_HUB_OFFLINE=1``. Files are blobs named by their hash with relative symlinks in the
    snapshot, as huggingface_hub stores them (copies where symlinks are unavailable).

    kwargs are `write_tiny_model`'s shape arguments. The commit hash is derived from them (and
    from repo_id and gguf_only), so different shapes get different snapshots and ``refs/main``
    points at the latest. Calling again is cheap: only missing files are built.

    ``with_gguf`` adds ``tiny-qwen3-Q8_0.gguf`` and ``tiny-qwen3-F16.gguf`` to the snapshot.
    ``gguf_only`` writes only those, like a ``*-GGUF`` repo on the hub: transformers reads a
    GGUF's tokenizer metadata (special tokens, chat template) only when no ``tokenizer.json``
    sits beside it; next to one, ``AutoTokenizer(..., gguf_file=...)`` loads ``tokenizer.json``
    and skips ``tokenizer_config.json``, so it has the same ids but no eos token or template.
    """
    spec = _spec(**kwargs)
    repo = _repo_folder(Path(cache_dir), repo_id)
    commit = _commit_hash(repo_id, spec, gguf_only=gguf_only)
    snapshot = repo / "snapshots" / commit
    ref = repo / "refs" / "main"
    names = _GGUF_FILES if gguf_only else _BASE_FILES + (_GGUF_FILES if with_gguf else ())

    missing = _missing(snapshot, names)
    if missing:
        snapshot.mkdir(parents=True, exist_ok=True)
        with _build_dir(repo) as build:
            if any(name in _BASE_FILES for name in missing):
                _write_model_dir(build, spec)
            if GGUF_Q8_0_FILENAME in missing:
                _write_gguf(build / GGUF_Q8_0_FILENAME, spec, quantize=True)
            if GGUF_F16_FILENAME in missing:
                _write_gguf(build / GGUF_F16_FILENAME, spec, quantize=False)
            for name in missing:
                _link_into_snapshot(build / name, repo, snapshot)
    if not ref.is_file() or ref.read_text(encoding="utf-8").strip() != commit:
        _write_text_atomic(ref, commit)
    return snapshot
