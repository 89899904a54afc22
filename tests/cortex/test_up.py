"""`cortex up --tiny`: a whole local fleet, one answer through the gateway, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import anthropic
import httpx
import openai

from tests.support.procs import console_script, free_port


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def test_cortex_up_tiny(tmp_path: Path) -> None:
    port = free_port()
    work = tmp_path / "fleet"
    out = tmp_path / "up.out"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "COLUMNS": "200"}
    with out.open("wb") as handle:
        proc = subprocess.Popen(
            [console_script("cortex"), "up", "--tiny", "--port", str(port), "--workdir", str(work)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while "helexa is up" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.2)
        banner = out.read_text()
        base = f"http://127.0.0.1:{port}"
        assert f"export ANTHROPIC_BASE_URL={base}" in banner
        assert f"curl -s {base}/v1/chat/completions" in banner
        assert banner.count('"max_tokens": 64') == 2  # both curls work as printed
        # The tiny model's Q8_0 GGUF, run by llama.cpp with room for Claude Code's prompt.
        neuron_toml = (work / "neuron.toml").read_text()
        assert 'quant = "Q8_0"' in neuron_toml and "context_tokens = 65536" in neuron_toml
        assert 'quant = "Q8_0"' in (work / "models.toml").read_text()
        neuron_port = int(neuron_toml.split("port = ")[1].split()[0])
        [served] = httpx.get(f"http://127.0.0.1:{neuron_port}/models", timeout=5).json()
        assert served["harness"] == "llamacpp" and served["context_length"] == 65536
        children = set(processes_mentioning(str(work))) - {proc.pid}
        assert len(children) == 2  # a neuron and a gateway
        # Greedy, so the answer is the same every run; the demo model's answers are a few
        # dozen tokens, so 4 runs to the limit.
        chat = openai.OpenAI(base_url=f"{base}/v1", api_key="x").chat.completions.create(
            model="helexa/default",
            max_tokens=4,
            temperature=0,
            messages=[{"role": "user", "content": "Hi"}],
        )
        assert chat.usage.prompt_tokens > 5 and chat.choices[0].finish_reason in {"stop", "length"}
        message = anthropic.Anthropic(base_url=base, api_key="x").messages.create(
            model="claude-sonnet-4-5",  # Claude Code's names: the fallback cortex up sets
            max_tokens=4,
            messages=[{"role": "user", "content": "Hi"}],
            extra_body={"temperature": 0},
        )
        assert message.model == "claude-sonnet-4-5" and message.usage.input_tokens > 5
        # Built in the work directory, not in the user's Hugging Face cache.
        assert (work / "hf-cache" / "models--helexa--tiny-qwen3").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert processes_mentioning(str(work)) == []
        assert "stopped" in out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_mentioning(str(work)):
            os.kill(pid, signal.SIGKILL)


def test_default_model_is_one_gguf_and_the_cache_probe_finds_it(tmp_path: Path) -> None:
    from helexa.core.tiny_model import write_tiny_model_to_hf_cache
    from helexa.cortex.up import DEFAULT_MODEL, cached, download_patterns, pick_quant

    assert (DEFAULT_MODEL, pick_quant(DEFAULT_MODEL, None)) == ("Qwen/Qwen3-0.6B-GGUF", "Q8_0")
    assert pick_quant("Qwen/Qwen3-8B", None) is None  # dense: safetensors on transformers
    assert pick_quant(DEFAULT_MODEL, "Q4_K_M") == "Q4_K_M"
    assert download_patterns("Q8_0") == ["*.json", "*.jinja", "*Q8_0*.gguf"]
    assert "*.safetensors" in download_patterns(None)
    cache = tmp_path / "hub"
    assert not cached("org/tiny-GGUF", cache, "Q8_0")
    write_tiny_model_to_hf_cache(cache, "org/tiny-GGUF", gguf_only=True)
    assert cached("org/tiny-GGUF", cache, "Q8_0")
    assert not cached("org/tiny-GGUF", cache, "Q4_K_M")  # another quant is not enough
    assert not cached("org/tiny-GGUF", cache)  # and no dense weights
