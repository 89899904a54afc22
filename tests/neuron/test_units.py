"""Pure pieces of the neuron: sampling, detokenizing, stop strings, admission, activation,
file resolution and configuration."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from helexa.core.errors import ApiError
from helexa.core.settings import ConfigError, load_settings
from helexa.core.wire import ChatCompletionRequest, ModelSpec
from helexa.neuron.activation import ActivationTracker, prewarm
from helexa.neuron.admission import Admission
from helexa.neuron.config import NeuronSettings
from helexa.neuron.detokenize import IncrementalDetokenizer, StopMatcher
from helexa.neuron.model_files import hf_cache_dir, resolve_local_dir, select_gguf
from helexa.neuron.sampling import SamplingParams, filter_logits, next_token, resolve_sampling
from helexa.up.tiny_model import build_tokenizer_dir
from tests.support.procs import console_script

# --- sampling ---------------------------------------------------------------------------------


def request(**kwargs) -> ChatCompletionRequest:  # type: ignore[no-untyped-def]
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **kwargs)


def resolve(req: ChatCompletionRequest, defaults: dict | None = None, prompt: int = 10):  # type: ignore[no-untyped-def]
    return resolve_sampling(
        req,
        token_limit=req.token_limit(),
        generation_defaults=defaults or {},
        eos_ids=frozenset({1, 2}),
        context_length=100,
        prompt_tokens=prompt,
    )


def test_request_beats_model_defaults_beat_fallbacks() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    params = resolve(request(temperature=0.2), defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.2, 0.9, 20)
    assert resolve(request()).temperature == 1.0 and resolve(request()).top_p == 1.0
    assert resolve(request(), {"temperature": 0.0}).greedy


def test_token_limit_is_clamped_to_the_context() -> None:
    assert resolve(request()).max_new_tokens == 90
    assert resolve(request(max_tokens=95)).max_new_tokens == 90  # within the context: clamped
    assert resolve(request(max_tokens=5, max_completion_tokens=7)).max_new_tokens == 7
    with pytest.raises(ApiError) as info:  # beyond the context itself: 400 (as vLLM)
        resolve(request(max_tokens=500))
    assert info.value.status == 400 and info.value.param == "max_tokens"
    with pytest.raises(ApiError) as info:
        resolve(request(), prompt=100)
    assert info.value.code == "context_length_exceeded" and info.value.status == 400


def test_top_k_top_p_min_p_masks() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    kept = lambda p: torch.isfinite(filter_logits(logits, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(SamplingParams(top_k=2)) == [0, 1]
    assert kept(SamplingParams(top_p=0.5)) == [0]
    assert kept(SamplingParams(top_p=0.9)) == [0, 1, 2]
    assert kept(SamplingParams(min_p=0.3)) == [0, 1]


def test_penalties_and_seeded_sampling() -> None:
    logits = torch.tensor([5.0, 4.9, -1.0])
    greedy = SamplingParams(temperature=0.0)
    assert next_token(logits, greedy, {}, None) == 0
    assert (
        next_token(logits, SamplingParams(temperature=0.0, frequency_penalty=1.0), {0: 1}, None)
        == 1
    )
    assert (
        next_token(
            logits,
            SamplingParams(temperature=0.0, repetition_penalty=1.5),
            {},
            None,
            frozenset({0}),
        )
        == 1
    )
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        draws.append([next_token(logits, SamplingParams(), {}, gen) for _ in range(20)])
    assert draws[0] == draws[1]


# --- detokenizing and stop strings ------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer_dir(path)
    return AutoTokenizer.from_pretrained(path)


def test_incremental_detokenizer_never_splits_a_code_point(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "weather ☀️ in 東京 — 🌧️ and ümlaut"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(
        tokenizer, prompt_tail=tokenizer.encode("Hi", add_special_tokens=False)
    )
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # streamed, not held to the end


def test_stop_matcher_holds_back_partial_matches() -> None:
    stops = StopMatcher(("STOP", "xy"))
    assert stops.push("abc ST") == "abc "
    assert stops.push("O") == ""
    assert stops.push("P tail") == ""
    assert stops.matched == "STOP"
    other = StopMatcher(("STOP",))
    assert other.push("abc ST") == "abc "
    assert other.push("ART") == "START"
    assert other.flush() == ""
    none = StopMatcher(())
    assert none.push("anything") == "anything"


# --- admission --------------------------------------------------------------------------------


def test_admission_queue_timeout_and_drain() -> None:
    async def scenario() -> None:
        gate = Admission(max_concurrent=1, max_queue=1, timeout_s=0.2, retry_after_s=3)
        await gate.acquire()
        waiter = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        assert (gate.in_flight, gate.queued) == (1, 1)
        with pytest.raises(ApiError) as full:
            await gate.acquire()
        assert full.value.status == 503 and full.value.headers["Retry-After"] == "3"
        gate.release()  # hands the slot to the waiter
        await waiter
        assert (gate.in_flight, gate.queued) == (1, 0)
        with pytest.raises(ApiError) as timed_out:
            await gate.acquire()
        assert timed_out.value.code == "queue_timeout"
        queued = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        gate.close()
        with pytest.raises(ApiError) as draining:
            await queued
        assert draining.value.code == "shutting_down"
        gate.release()
        assert gate.in_flight == 0

    asyncio.run(scenario())


def test_a_queued_place_polls_leaves_and_passes_on_a_slot_it_never_took() -> None:
    """``join`` decides at once (a slot, a place, or 503); ``wait`` with a poll interval
    says "still queued" without losing the place, so a stream can send keep-alives; a
    request that leaves gives its place up, and a slot that reached it passes on."""

    async def scenario() -> None:
        gate = Admission(max_concurrent=1, max_queue=2, timeout_s=0.3, retry_after_s=1)
        assert gate.join() is None  # the slot, at once
        place = gate.join()
        assert place is not None and gate.queued == 1
        assert await gate.wait(place, 0.01) is False  # still queued: a keep-alive
        assert gate.queued == 1
        gate.release()  # the slot goes to the place
        assert await gate.wait(place, 0.01) is True
        assert await gate.wait(place, 0.01) is True  # asked again: still the caller's
        gate.leave(place)  # admitted: the holder releases, leave changes nothing
        assert gate.in_flight == 1
        left = gate.join()
        assert left is not None
        gate.release()  # handed to ``left``, whose request is gone before it looks
        gate.leave(left)  # so the slot passes on: nothing is held
        assert (gate.in_flight, gate.queued) == (0, 0)
        gate.leave(left)  # twice: still nothing released twice
        assert gate.in_flight == 0
        assert gate.join() is None
        late = gate.join()
        assert late is not None
        assert await gate.wait(late, 0.2) is False
        with pytest.raises(ApiError) as timed_out:  # the timeout counts from joining
            await gate.wait(late, 0.2)
        assert timed_out.value.code == "queue_timeout" and gate.queued == 0
        gate.release()
        assert gate.in_flight == 0

    asyncio.run(scenario())


# --- activation -------------------------------------------------------------------------------


def test_prewarm_moves_ids_and_survives_failures() -> None:
    specs = [ModelSpec(model_id="a/bad"), ModelSpec(model_id="b/good")]
    tracker = ActivationTracker(specs)
    seen: list[dict] = []

    async def load(spec: ModelSpec) -> None:
        seen.append(tracker.snapshot().model_dump())
        if spec.model_id == "a/bad":
            raise ApiError(404, "no weights")

    assert tracker.snapshot().state == "pre_warming"
    asyncio.run(prewarm(specs, tracker, load))
    assert seen[0]["in_progress"] == "a/bad" and seen[0]["pending"] == ["b/good"]
    final = tracker.snapshot()
    assert final.state == "ready" and final.completed == ["b/good"]
    assert final.failed[0].model_id == "a/bad" and final.failed[0].error == "no weights"
    assert ActivationTracker([]).snapshot().state == "ready"


# --- model files ------------------------------------------------------------------------------


def test_cache_resolution_order(tmp_path: Path) -> None:
    env = {"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}
    assert hf_cache_dir(tmp_path, env) == tmp_path
    assert hf_cache_dir(None, env) == Path("/c")
    assert hf_cache_dir(None, {"HF_HOME": "/h"}) == Path("/h/hub")
    assert hf_cache_dir(None, {}).parts[-3:] == (".cache", "huggingface", "hub")


def test_local_dirs_and_escapes(tmp_path: Path) -> None:
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    dirs = [tmp_path / "models"]
    assert resolve_local_dir("mine", dirs) == (tmp_path / "models" / "mine").resolve()
    assert resolve_local_dir(str(tmp_path / "models" / "mine"), dirs) is not None
    assert resolve_local_dir("Qwen/Qwen3-8B", dirs) is None
    for escape in ("../outside", str(tmp_path / "outside"), "mine/../../outside"):
        with pytest.raises(ApiError) as info:
            resolve_local_dir(escape, dirs)
        assert info.value.status == 403
    (tmp_path / "models" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ApiError):
        resolve_local_dir("./link", dirs)


def test_gguf_selection_by_tag() -> None:
    files = ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-q4_k_s.gguf", "README.md"]
    assert select_gguf(files, "Q4_K_M") == "m-Q4_K_M.gguf"
    assert select_gguf(files, "q8_0") == "m-Q8_0.gguf"
    with pytest.raises(ApiError) as missing:
        select_gguf(files, "Q2_K")
    assert missing.value.status == 404 and "m-Q8_0.gguf" in missing.value.message


# --- configuration ----------------------------------------------------------------------------


def test_defaults_without_a_file() -> None:
    settings = load_settings(NeuronSettings, None)
    assert settings.port == 13131
    assert [h.name for h in settings.harnesses] == ["transformers", "llamacpp"]


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(
        'port = 1\n[harness.transformers]\nhf_cache = "/from-file"\n'
        '[[default_models]]\nmodel_id = "a/b"\nquant = "Q4_K_M"\n'
    )
    monkeypatch.setenv("NEURON_PORT", "2222")
    monkeypatch.setenv("NEURON_HARNESS__TRANSFORMERS__HF_CACHE", "/from-env")
    settings = load_settings(NeuronSettings, config)
    assert settings.port == 2222
    assert settings.harness.transformers.hf_cache == Path("/from-env")
    assert settings.default_models[0].quant == "Q4_K_M"
    assert load_settings(NeuronSettings, config, {"port": 3333}).port == 3333


def test_bad_files_name_the_line_or_key(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('port = 13131\nhost = "unterminated\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_settings(NeuronSettings, broken)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('port = "many"\n[admission]\nmax_queue = -1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(NeuronSettings, wrong)
    assert "port" in str(info.value) and "admission.max_queue" in str(info.value)
    typo = tmp_path / "typo.toml"
    typo.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_settings(NeuronSettings, typo)


def test_cli_refuses_unparseable_config(tmp_path: Path) -> None:
    broken = tmp_path / "neuron.toml"
    broken.write_text("port = = 3\n")
    result = subprocess.run(
        [console_script("neuron"), "--config", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "line 1" in result.stderr and str(broken) in result.stderr


def test_invalid_byte_runs_are_not_held_back_forever(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A model emitting lone continuation bytes must still stream (as U+FFFD)."""
    byte_ids = [
        i
        for t, i in tokenizer.get_vocab().items()
        if len(t) == 1 and tokenizer.decode([i]) == "\ufffd"
    ]
    assert byte_ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(byte_ids[0]) for _ in range(12)]
    assert any(pieces[:6]), "the stream stalled on invalid bytes"


def test_system_turns_mid_conversation(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The template decides how a later system turn renders; one that refuses it gets it
    folded into the next user turn instead of a 400."""
    from helexa.core.wire import ChatMessage
    from helexa.neuron.harness.prompt import render_chat

    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="system", content="Agent types: none."),
    ]
    text = render_chat(tokenizer, messages, None, None).text
    assert (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>system\nAgent types: none.<|im_end|>" in text
    )
    strict = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
        "{{ raise_exception('System message must be at the beginning.') }}{% endif %}"
        "<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    )
    folded = render_chat(strict, messages, None, None).text
    assert folded == "<system>Be brief.</system><user>hi\n\nAgent types: none.</user>"
    later = [*messages[:2], messages[2], ChatMessage(role="user", content="go")]
    folded = render_chat(strict, later, None, None).text
    assert folded.endswith("<user>hi</user><user>Agent types: none.\n\ngo</user>")
