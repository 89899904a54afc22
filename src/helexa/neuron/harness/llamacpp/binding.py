"""llama.cpp through llama-cpp-python's low-level (ctypes) API: the only module importing it.

The high-level ``llama_cpp.Llama`` runs one sequence per context; the neuron decodes many
sequences in one context (one batch per step, as llama.cpp's own server does with slots),
so it drives the C API directly: model, context, batch, per-sequence sampler chains and
the KV memory of each sequence. Every call here runs on the model's device worker thread.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as C
import numpy as np
from llama_cpp.llama_grammar import SchemaConverter

from helexa.neuron.sampling import OutputFormat, SamplingParams

log = logging.getLogger("helexa.neuron.llamacpp")

_init_lock = threading.Lock()
_initialised = False
# llama.cpp logs through this callback; the reference keeps ctypes from freeing it.
_log_callback: object = None
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # GGML_LOG_LEVEL_WARN / _ERROR


LOG_LINE_CHARS = 2000
_recent = threading.local()  # this thread's last llama.cpp error: why a call failed


def _forward_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # Info and debug chatter (every tensor it loads) would drown the neuron's log.
    python_level = _LOG_LEVELS.get(level)
    if python_level is not None and text:
        message = text.decode("utf-8", errors="replace").strip()
        if len(message) > LOG_LINE_CHARS:  # a refused grammar is echoed whole: keep its head
            message = f"{message[:LOG_LINE_CHARS]}… ({len(message)} characters)"
        if message:
            log.log(python_level, "llama.cpp: %s", message)
            if python_level >= logging.ERROR:  # the cause comes first, "failed to load" last
                _recent.errors = [*getattr(_recent, "errors", [])[-3:], message]


def init_backend() -> None:
    """Once per process: llama.cpp's backends, its log routed to ours."""
    global _initialised, _log_callback
    with _init_lock:
        if _initialised:
            return
        _log_callback = C.llama_log_callback(_forward_log)
        C.llama_log_set(_log_callback, ctypes.c_void_p(0))
        C.llama_backend_init()
        _initialised = True


def cpu_features() -> dict[str, str]:
    """What this llama.cpp build runs on the CPU (``llama_print_system_info``'s ``CPU`` part):
    ``{"AVX2": "1", "AVX512": "1", "AMX_INT8": "1", ...}``."""
    info = C.llama_print_system_info().decode("utf-8", errors="replace")
    features: dict[str, str] = {}
    for section in info.split("|"):
        name, sep, value = section.rpartition("=")
        name = name.split(":")[-1].strip()
        if sep and name:
            features[name] = value.strip()
    return features


def cpu_advertises(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return flag in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def amx_unsafe() -> bool:
    """True when this llama.cpp has its AMX path compiled in on a CPU that advertises AMX:
    where the tile state is not usable its first matmul dies with SIGILL (upstream llama.cpp
    PR #26954), so the neuron keeps llama.cpp's extra buffer types (AMX's among them) off.
    scripts/dev.sh builds without that path, so this only guards builds made elsewhere."""
    return cpu_features().get("AMX_INT8") == "1" and cpu_advertises("amx_tile")


def describe_build() -> str:
    """One line for the log: the CPU kernels this llama.cpp uses here."""
    features = cpu_features()
    on = [name for name, value in features.items() if value == "1" and name.isupper()]
    amx = (
        "AMX compiled in and the CPU advertises it: extra buffer types off"
        if amx_unsafe()
        else "AMX in use"
        if features.get("AMX_INT8") == "1"
        else "no AMX"
    )
    return f"{' '.join(on) or 'no SIMD extensions'}; {amx}"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_offload_supported() -> bool:
    return bool(C.llama_supports_gpu_offload())


def max_devices() -> int:
    return int(C.llama_max_devices())


# -- model and vocabulary ------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuPlacement:
    """Where the layers go: ``main_gpu`` alone, or split across ``tensor_split`` (fractions per
    CUDA index, llama.cpp's layer split). With ``devices`` (a pooled model: remote RPC
    devices, then the local GPU if any) the split is over exactly those, in that order."""

    main_gpu: int
    tensor_split: tuple[float, ...] = ()
    n_gpu_layers: int = -1
    devices: tuple[ctypes.c_void_p, ...] = ()
    buffer_overrides: ctypes.Array[Any] | None = None  # llama_model_tensor_buft_override[]


class Model:
    """Weights (memory-mapped, quantized as stored) and vocabulary of one GGUF file."""

    def __init__(self, path: Path, gpu: GpuPlacement | None) -> None:
        init_backend()
        params = C.llama_model_default_params()
        params.n_gpu_layers = 0 if gpu is None else gpu.n_gpu_layers
        if amx_unsafe() and hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        self._split = None
        self._devices = None
        if gpu is not None and gpu.devices:
            self._devices = (ctypes.c_void_p * (len(gpu.devices) + 1))(*gpu.devices, None)
            params.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        self._overrides = gpu.buffer_overrides if gpu is not None else None
        if self._overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
        if gpu is not None:
            params.main_gpu = gpu.main_gpu
            if gpu.tensor_split:
                params.split_mode = C.LLAMA_SPLIT_MODE_LAYER
                fractions = list(gpu.tensor_split) + [0.0] * (max_devices() - len(gpu.tensor_split))
                self._split = (ctypes.c_float * len(fractions))(*fractions)
                params.tensor_split = self._split
            else:
                params.split_mode = C.LLAMA_SPLIT_MODE_NONE
        _recent.errors = []
        self.ptr = C.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            why = "; ".join(_recent.errors) or "see the neuron's log for why"
            raise ValueError(f"llama.cpp could not load {path.name}: {why}")
        self.vocab = Vocab(C.llama_model_get_vocab(self.ptr))

    def meta(self, key: str) -> str | None:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    @property
    def n_ctx_train(self) -> int:
        return int(C.llama_model_n_ctx_train(self.ptr))

    @property
    def n_layer(self) -> int:
        return int(C.llama_model_n_layer(self.ptr))

    @property
    def n_head(self) -> int:
        return int(C.llama_model_n_head(self.ptr))

    @property
    def n_head_kv(self) -> int:
        return int(C.llama_model_n_head_kv(self.ptr))

    @property
    def n_embd(self) -> int:
        return int(C.llama_model_n_embd(self.ptr))

    def free(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None


class Vocab:
    """Tokenize and render tokens with the model's own vocabulary (what the weights index)."""

    def __init__(self, ptr: ctypes.c_void_p) -> None:
        self.ptr = ptr
        self.n_tokens = int(C.llama_vocab_n_tokens(ptr))
        self._pieces: dict[tuple[int, bool], bytes] = {}

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; control tokens written out in it (``<|im_start|>``) become
        those tokens only with ``parse_special`` (template markup), never in client text."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (C.llama_token * capacity)()
            n = C.llama_tokenize(
                self.ptr, data, len(data), out, capacity, add_special, parse_special
            )
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def control_texts(self) -> tuple[str, ...]:
        """How each control token is written (``<|im_start|>``, ``<|endoftext|>``, ...), and
        the unknown token's (``<unk>``): markup tokenization parses both."""
        control = C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_UNKNOWN
        texts = {
            self.piece(token, special=True).decode("utf-8", errors="replace")
            for token in range(self.n_tokens)
            if C.llama_vocab_get_attr(self.ptr, token) & control
        }
        return tuple(sorted(t for t in texts if t))

    def piece(self, token: int, *, special: bool) -> bytes:
        """The bytes of one token; control tokens render only with ``special``."""
        key = (token, special)
        cached = self._pieces.get(key)
        if cached is None:  # a buffer per miss: the loop and the device thread both render
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, special)
            cached = buf.raw[:n]
            self._pieces[key] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.ptr, token))

    def special_id(self, which: str) -> int | None:
        token = int(getattr(C, f"llama_vocab_{which}")(self.ptr))
        return token if 0 <= token < self.n_tokens else None

    def adds_bos(self) -> bool:
        return bool(C.llama_vocab_get_add_bos(self.ptr))


# -- context, batch, memory ------------------------------------------------------------------------


class DecodeError(RuntimeError):
    """llama_decode failed for a reason other than a full KV cache."""


class Context:
    """One llama.cpp context: a KV cache of ``n_ctx`` cells shared by up to ``n_seq_max``
    sequences (unified: a sequence may use any free cell, and copied prefixes share cells)."""

    def __init__(
        self,
        model: Model,
        *,
        n_ctx: int,
        n_batch: int,
        n_seq_max: int,
        threads: int | None,
        flash_attn: bool | None,
    ) -> None:
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        params.no_perf = True
        # llama.cpp's own default is a fixed 4 threads whatever the host has.
        threads = threads or usable_cores()
        params.n_threads = threads
        params.n_threads_batch = threads
        if flash_attn is not None:
            params.flash_attn_type = (
                C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        self.ptr = C.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise MemoryError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.memory = C.llama_get_memory(self.ptr)
        self.n_ctx = int(C.llama_n_ctx(self.ptr))
        self.n_vocab = model.vocab.n_tokens

    def decode(self, batch: Batch) -> bool:
        """Evaluate ``batch``; False when the KV cache has no room for it (nothing changed)."""
        batch.raw.n_tokens = batch.n_tokens
        rc = int(C.llama_decode(self.ptr, batch.raw))
        if rc == 0:
            return True
        if rc == 1:
            return False
        raise DecodeError(f"llama_decode failed with code {rc}")

    def logit_finite(self, index: int, token: int) -> bool:
        """Whether the logit the sampler chose from is a number (a NaN row has no good
        choice; checking one value keeps this off the per-token cost)."""
        return math.isfinite(C.llama_get_logits_ith(self.ptr, index)[token])

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop a sequence's cells from position ``start`` on."""
        C.llama_memory_seq_rm(self.memory, seq, start, -1)

    def share(self, src: int, dst: int, length: int) -> None:
        """``dst`` sees ``src``'s first ``length`` positions (cells are shared, not copied)."""
        C.llama_memory_seq_cp(self.memory, src, dst, 0, length)

    def clear(self) -> None:
        C.llama_memory_clear(self.memory, True)

    def sequence_state_size(self, seq: int) -> int:
        """Bytes ``save_sequence`` would take (nothing is copied)."""
        return int(C.llama_state_seq_get_size(self.ptr, seq))

    def save_sequence(self, seq: int) -> ctypes.Array[ctypes.c_uint8] | None:
        """A copy of a sequence's KV cells in host memory (``restore_sequence`` puts it back);
        None when llama.cpp wrote nothing."""
        size = self.sequence_state_size(seq)
        if size <= 0:
            return None
        buf = (ctypes.c_uint8 * size)()
        written = int(C.llama_state_seq_get_data(self.ptr, buf, size, seq))
        return buf if written == size else None

    def restore_sequence(self, seq: int, state: ctypes.Array[ctypes.c_uint8]) -> bool:
        """Give the (empty) sequence ``seq`` the cells saved by ``save_sequence``; False when
        the cache has no room for them (nothing changed)."""
        return int(C.llama_state_seq_set_data(self.ptr, state, len(state), seq)) > 0

    def free(self) -> None:
        if self.ptr:
            C.llama_free(self.ptr)
            self.ptr = None


class Batch:
    """A reusable llama_batch of up to ``capacity`` tokens, one sequence id per token."""

    def __init__(self, capacity: int, n_seq_max: int) -> None:
        self.capacity = capacity
        self.raw = C.llama_batch_init(capacity, 0, n_seq_max)
        self._tokens = np.ctypeslib.as_array(self.raw.token, shape=(capacity,))
        self._pos = np.ctypeslib.as_array(self.raw.pos, shape=(capacity,))
        self._n_seq = np.ctypeslib.as_array(self.raw.n_seq_id, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(self.raw.logits, shape=(capacity,))
        self._n_seq[:] = 1
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0

    def add(self, seq: int, tokens: list[int], start_pos: int, *, logits_last: bool) -> int:
        """Append ``tokens`` of ``seq`` at positions ``start_pos…``; the batch index of the last
        one (whose logits are kept when ``logits_last``)."""
        first, count = self.n_tokens, len(tokens)
        end = first + count
        self._tokens[first:end] = tokens
        self._pos[first:end] = np.arange(start_pos, start_pos + count, dtype=np.int32)
        self._logits[first:end] = 0
        if logits_last:
            self._logits[end - 1] = 1
        seq_ids = self.raw.seq_id
        for index in range(first, end):
            seq_ids[index][0] = seq
        self.n_tokens = end
        return end - 1

    def free(self) -> None:
        if self.raw is not None:
            C.llama_batch_free(self.raw)
            self.raw = None


# -- sampling --------------------------------------------------------------------------------------


# llama_token_data as numpy sees it: the whole row of logits is copied in one step.
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class Sampler:
    """One sequence's sampler chain: penalties, grammar, then temperature and truncation, or
    greedy. Repetition penalty covers prompt and output (HF semantics); presence and frequency
    only the output (OpenAI semantics), so they are two llama.cpp penalty stages."""

    def __init__(
        self,
        params: SamplingParams,
        *,
        vocab: Vocab,
        context_length: int,
        grammar: Grammar | None,
        prompt: list[int],
    ) -> None:
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        self.ptr = chain
        add = lambda stage: C.llama_sampler_chain_add(chain, stage)  # noqa: E731
        if params.repetition_penalty != 1.0:
            repeat = C.llama_sampler_init_penalties(
                vocab.n_tokens, context_length, params.repetition_penalty, 0.0, 0.0
            )
            add(repeat)
            for token in prompt:  # the chain as a whole sees only generated tokens
                C.llama_sampler_accept(repeat, token)
        if params.presence_penalty or params.frequency_penalty:
            add(
                C.llama_sampler_init_penalties(
                    vocab.n_tokens,
                    context_length,
                    1.0,
                    params.frequency_penalty,
                    params.presence_penalty,
                )
            )
        # The grammar stands beside the chain, not in it: most sampled tokens already fit the
        # grammar, and testing one token is cheap where masking the whole vocabulary costs
        # ~0.4 s a step for a 1 000-way enum (llama-server samples grammar-last the same way).
        self.grammar = grammar.take() if grammar is not None else None
        if self.grammar is not None:
            n = vocab.n_tokens
            self._cur = (C.llama_token_data * n)()
            self._rows = np.frombuffer(self._cur, dtype=_TOKEN_DATA)
            self._rows["id"] = np.arange(n, dtype=np.int32)
            self._all = C.llama_token_data_array(self._cur, n, -1, False)
            self._one = (C.llama_token_data * 1)()
            self._single = C.llama_token_data_array(self._one, 1, -1, False)
        if params.greedy:
            add(C.llama_sampler_init_greedy())
        else:
            add(C.llama_sampler_init_temp(params.temperature))
            if params.top_k > 0:
                add(C.llama_sampler_init_top_k(params.top_k))
            if params.min_p > 0.0:
                add(C.llama_sampler_init_min_p(params.min_p, 1))
            if params.top_p < 1.0:
                add(C.llama_sampler_init_top_p(params.top_p, 1))
            seed = C.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            add(C.llama_sampler_init_dist(seed))

    def sample(self, ctx: Context, index: int) -> int:
        """The next token from the logits at batch ``index``; the chain has accepted it
        (penalties count it, the grammar advances)."""
        if self.grammar is None:
            return int(C.llama_sampler_sample(self.ptr, ctx.ptr, index))
        logits = C.llama_get_logits_ith(ctx.ptr, index)
        token = self._choose(logits, masked=False)
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 1.0, 0.0
        self._single.size, self._single.selected, self._single.sorted = 1, -1, False
        C.llama_sampler_apply(self.grammar, ctypes.byref(self._single))
        if not math.isfinite(self._one[0].logit):  # the grammar refuses it: choose again
            token = self._choose(logits, masked=True)
        C.llama_sampler_accept(self.grammar, token)
        C.llama_sampler_accept(self.ptr, token)
        return token

    def _choose(self, logits: Any, *, masked: bool) -> int:
        """The chain's choice over every logit (first masked by the grammar)."""
        n = len(self._rows)
        self._rows["logit"] = np.ctypeslib.as_array(logits, shape=(n,))
        self._rows["p"] = 0.0
        self._all.data, self._all.size = self._cur, n
        self._all.selected, self._all.sorted = -1, False
        if masked:
            C.llama_sampler_apply(self.grammar, ctypes.byref(self._all))
        C.llama_sampler_apply(self.ptr, ctypes.byref(self._all))
        return int(self._all.data[self._all.selected].id)

    def free(self) -> None:
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            C.llama_sampler_free(self.grammar)
            self.grammar = None


# -- grammars --------------------------------------------------------------------------------------

ANY_OBJECT = '{"type":"object"}'
# Reasoning stays free: any text that does not spell the closing tag, then the tag.
_THINK_RULES = r"""think-body ::= think-char* "</think>" [\n]{0,2}
think-char ::= [^<] | "<" ( [^/] | "/" ( [^t] | "t" ( [^h] | "h" ( [^i] | "i" (
  [^n] | "n" ( [^k] | "k" [^>] ) ) ) ) ) )"""


def json_grammar(fmt: OutputFormat, reasoning: str) -> str:
    """GBNF for ``fmt``: compact JSON (no free whitespace a model could loop in), after an
    optional (``reasoning="optional"``) or already opened (``"open"``) ``<think>`` block."""
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    schema = json.loads(fmt.schema or ANY_OBJECT)
    schema = converter.resolve_refs(schema, "request")
    # A primitive schema ({"type": "null"}) comes back as the shared rule's own name.
    doc = converter.visit(schema, "json-doc")
    rules = (
        converter.format_grammar()
        .replace('space ::= " "?', 'space ::= ""')
        # Raw control characters are not JSON; this converter's string rule lets them in.
        .replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')
    )
    if reasoning == "open":
        root = f"root ::= think-body {doc}"
    elif reasoning == "optional":
        root = f'root ::= ( "<think>" think-body )? {doc}'
    else:
        return f"root ::= {doc}\n{rules}"
    return f"{root}\n{_THINK_RULES}\n{rules}"


class Grammar:
    """A GBNF grammar parsed into a sampler stage for one request, off the device worker (a
    large grammar takes tens of milliseconds to parse, which would stall every model's
    step). Not cloned from a shared copy: llama.cpp's clone re-links every stack element by
    searching the rules, which for a 1 000-way enum costs more than parsing afresh."""

    def __init__(self, vocab: Vocab, text: str) -> None:
        self.vocab = vocab  # whose token ids it speaks: only that model may use it
        self.ptr = C.llama_sampler_init_grammar(vocab.ptr, text.encode(), b"root")
        if not self.ptr:
            raise ValueError("llama.cpp could not parse the grammar built from the schema")

    def take(self) -> ctypes.c_void_p:
        """The stage, now owned by the caller's chain (once)."""
        ptr, self.ptr = self.ptr, None
        if not ptr:
            raise ValueError("this grammar is already in use")
        return ptr

    def __del__(self) -> None:  # never taken: the request ended before it started
        if getattr(self, "ptr", None):
            C.llama_sampler_free(self.ptr)
            self.ptr = None
