"""The tiny Qwen3 model: hub-cache layout, transformers loading, chat template, GGUF."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir, snapshot_download
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
)

from helexa.up.tiny_model import (
    GGUF_F16_FILENAME,
    GGUF_Q8_0_FILENAME,
    TINY_REPO_ID,
    build_tokenizer_dir,
    write_tiny_model,
    write_tiny_model_to_hf_cache,
)

VOCAB = 512
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
UNICODE_TEXTS = [
    "Hello, world!",
    "emoji 😀🚀 family \U0001f469\u200d\U0001f469\u200d\U0001f467 flag \U0001f1eb\U0001f1f7",
    "中文字符\uff0c日本語のテキスト、한국어",
    "combining e\u0301 vs \u00e9, ligature \ufb01, zero\u200bwidth",
    "  leading spaces\ttabs\r\nand\n\nnewlines  ",
    "<think>tags</think> <tool_call>{}</tool_call><|im_end|>",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache_dir = tmp_path_factory.mktemp("hf-cache")
    started = time.perf_counter()
    write_tiny_model_to_hf_cache(cache_dir, with_gguf=True)
    assert time.perf_counter() - started < 10
    return cache_dir


@pytest.fixture(scope="module")
def snapshot(cache: Path) -> Path:
    return Path(snapshot_download(TINY_REPO_ID, cache_dir=cache, local_files_only=True))


@pytest.fixture(scope="module")
def tokenizer(snapshot: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(snapshot)


@pytest.fixture(scope="module")
def model(snapshot: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(snapshot).eval()


def test_hub_cache_layout_resolves_offline(cache: Path, snapshot: Path) -> None:
    repo = cache / "models--helexa--tiny-qwen3"
    commit = (repo / "refs" / "main").read_text()
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert snapshot == repo / "snapshots" / commit
    names = {p.name for p in snapshot.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        GGUF_Q8_0_FILENAME,
        GGUF_F16_FILENAME,
    }
    for path in snapshot.iterdir():
        if path.is_symlink():
            assert path.resolve().parent == (repo / "blobs").resolve()
    config = json.loads((snapshot / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    (cached,) = [r for r in scan_cache_dir(cache).repos if r.repo_id == TINY_REPO_ID]
    assert "main" in {ref for rev in cached.revisions for ref in rev.refs}


def test_second_call_is_cheap_and_identical(cache: Path, snapshot: Path) -> None:
    before = {p.name: p.read_bytes() for p in snapshot.iterdir()}
    started = time.perf_counter()
    again = write_tiny_model_to_hf_cache(cache, with_gguf=True)
    assert time.perf_counter() - started < 0.5
    assert again == snapshot
    assert {p.name: p.read_bytes() for p in again.iterdir()} == before


def test_other_shape_gets_its_own_snapshot(tmp_path: Path) -> None:
    small = write_tiny_model_to_hf_cache(tmp_path, num_layers=1, hidden_size=32)
    default = write_tiny_model_to_hf_cache(tmp_path)
    assert small != default
    assert (default.parent.parent / "refs" / "main").read_text() == default.name
    assert json.loads((small / "config.json").read_text())["num_hidden_layers"] == 1
    with pytest.raises(TypeError):
        write_tiny_model_to_hf_cache(tmp_path, head_dim=64)


def test_plain_directory_is_deterministic(tmp_path: Path, snapshot: Path) -> None:
    first = write_tiny_model(tmp_path / "a")
    second = write_tiny_model(tmp_path / "b")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
        assert (first / name).read_bytes() == (snapshot / name).read_bytes()
    other_seed = write_tiny_model(tmp_path / "c", seed=1)
    assert (other_seed / "model.safetensors").read_bytes() != (
        first / "model.safetensors"
    ).read_bytes()


def test_loads_from_repo_id_and_runs_forward(
    cache: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        TINY_REPO_ID, cache_dir=cache, local_files_only=True
    ).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB)
    assert torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids.shape[1] + 4


def test_generation_config(snapshot: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    generation = GenerationConfig.from_pretrained(snapshot)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert generation.eos_token_id == [im_end, endoftext]
    assert generation.temperature == 0.7
    assert generation.top_p == 0.8
    assert generation.top_k == 20
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"


def test_tokenizer_vocab_and_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    assert len(tokenizer) == VOCAB
    for token in (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
    ):
        assert tokenizer.tokenize(token) == [token]
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_unicode_round_trip(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(0 <= i < VOCAB for i in ids)
    assert tokenizer.decode(ids) == text


def test_chat_template_with_tools(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": '{"celsius": 23}'},
    ]
    text = tokenizer.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    tools_block = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(tools_block) == TOOLS[0]
    assert (
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert (
        '<|im_start|>user\n<tool_response>\n{"celsius": 23}\n</tool_response><|im_end|>\n' in text
    )
    assert text.endswith("<|im_start|>assistant\n")

    no_think = tokenizer.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert no_think == text + "<think>\n\n</think>\n\n"

    plain = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=False, tokenize=False
    )
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_thinking_history(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nanswer a"},
        {"role": "user", "content": "b"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # earlier turns lose their reasoning, as with Qwen3
    assert "old reasoning" not in text
    assert "<|im_start|>assistant\nanswer a<|im_end|>\n" in text


def test_build_tokenizer_dir(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    build_tokenizer_dir(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    alone = AutoTokenizer.from_pretrained(tmp_path)
    assert alone.encode(UNICODE_TEXTS[1]) == tokenizer.encode(UNICODE_TEXTS[1])
    assert alone.chat_template == tokenizer.chat_template


def test_gguf_files(snapshot: Path) -> None:
    gguf = pytest.importorskip("gguf")
    for name, matrix_type in (
        (GGUF_Q8_0_FILENAME, gguf.GGMLQuantizationType.Q8_0),
        (GGUF_F16_FILENAME, gguf.GGMLQuantizationType.F16),
    ):
        reader = gguf.GGUFReader(snapshot / name)
        field = reader.get_field("general.architecture")
        assert field is not None and field.contents() == "qwen3"
        model_field = reader.get_field("tokenizer.ggml.model")
        assert model_field is not None and model_field.contents() == "gpt2"
        tokens = reader.get_field("tokenizer.ggml.tokens")
        assert tokens is not None and len(tokens.data) == VOCAB
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert "output.weight" not in types  # tied embeddings, as llama.cpp writes them
        assert types["token_embd.weight"] == matrix_type
        assert types["blk.0.attn_q.weight"] == matrix_type
        assert types["blk.0.attn_q_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_gguf_tokenizer(tmp_path: Path, snapshot: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    pytest.importorskip("gguf")
    # beside tokenizer.json, transformers takes the ids from it: they must agree with the GGUF's
    beside = AutoTokenizer.from_pretrained(snapshot, gguf_file=GGUF_Q8_0_FILENAME)
    # alone, as in a *-GGUF repo, the GGUF's metadata provides everything
    gguf_repo = write_tiny_model_to_hf_cache(
        tmp_path, f"{TINY_REPO_ID}-GGUF", with_gguf=True, gguf_only=True
    )
    assert {p.name for p in gguf_repo.iterdir()} == {GGUF_Q8_0_FILENAME, GGUF_F16_FILENAME}
    alone = AutoTokenizer.from_pretrained(gguf_repo, gguf_file=GGUF_Q8_0_FILENAME)
    assert len(alone) == VOCAB
    assert alone.eos_token == "<|im_end|>"
    assert alone.pad_token == "<|endoftext|>"
    assert alone.chat_template == tokenizer.chat_template
    for text in UNICODE_TEXTS:
        want = tokenizer.encode(text, add_special_tokens=False)
        assert beside.encode(text, add_special_tokens=False) == want
        assert alone.encode(text, add_special_tokens=False) == want
        assert alone.decode(want) == text
    messages = [{"role": "user", "content": "hi"}]
    kwargs = {"tools": TOOLS, "add_generation_prompt": True, "tokenize": False}
    assert alone.apply_chat_template(messages, **kwargs) == tokenizer.apply_chat_template(
        messages, **kwargs
    )


@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="transformers needs accelerate to load a GGUF model",
)
@pytest.mark.parametrize(
    ("name", "tolerance"), [(GGUF_F16_FILENAME, 5e-3), (GGUF_Q8_0_FILENAME, 5e-2)]
)
def test_gguf_model_matches_safetensors(
    snapshot: Path,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    tolerance: float,
) -> None:
    from_gguf = AutoModelForCausalLM.from_pretrained(snapshot, gguf_file=name).eval()
    assert from_gguf.config.model_type == "qwen3"
    assert from_gguf.config.vocab_size == VOCAB
    ids = tokenizer("Once upon a time 你好 😀", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
        got = from_gguf(ids.to(from_gguf.device)).logits.float()
    assert got.shape == (1, ids.shape[1], VOCAB)
    assert (got - want).abs().max().item() < tolerance
