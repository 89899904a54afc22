"""Web pages cannot drive a fleet (core.browser): a real cortex in front of a real neuron,
both without keys or tokens (as ``cortex up`` runs them). A foreign Origin, a non-JSON body
or a name the daemon does not know is refused on both; curl, the SDKs and pages of a
configured origin are served."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anthropic
import httpx
import openai
import pytest

from helexa.up.tiny_model import TINY_REPO_ID
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, console_script, free_port, start_neuron

APP = "http://app.example:8080"  # the one origin this cortex allows
EVIL = "http://evil.example"
CHAT = {"model": TINY_REPO_ID, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {**CHAT, "model": "claude-test"}
UNLOAD = {"model_id": TINY_REPO_ID}


@dataclass
class Local:
    cortex: Daemon
    base: str
    metrics: str
    neuron: Daemon
    neuron_url: str

    def loaded(self) -> list[str]:
        models = httpx.get(f"{self.neuron_url}/models", timeout=10).json()
        return [m["id"] for m in models if m["status"] == "loaded"]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, hf_cache: Path) -> Iterator[Local]:
    work = tmp_path_factory.mktemp("browser")
    neuron, url = start_neuron(
        work,
        f'keepalive_s = 0.5\n[[default_models]]\nmodel_id = "{TINY_REPO_ID}"\n',
        hf_cache=hf_cache,
        name="browser-neuron",
    )
    models = (
        f'[[models]]\nid = "{TINY_REPO_ID}"\nvram_mb = 60\nmin_devices = 0\n'
        f'[fallbacks]\n"claude-*" = "{TINY_REPO_ID}"\n'
    )
    http = f'[http]\nallowed_origins = ["{APP}"]\nallowed_hosts = ["gateway.example"]\n'
    cortex, base, metrics = start_cortex(work, {"n": url}, models, extra=http, name="browser")
    yield Local(cortex, base, metrics, neuron, url)
    cortex.stop()
    neuron.stop()


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_foreign_page_cannot_unload_or_load(local: Local) -> None:
    """The reported hole: text/plain (no preflight) from another origin unloaded the model."""
    assert TINY_REPO_ID in local.loaded()
    page = {"origin": EVIL, "content-type": "text/plain"}
    for content_type in ("text/plain", "application/json"):
        headers = {"origin": EVIL, "content-type": content_type}
        refused = httpx.post(
            f"{local.base}/admin/models/unload", json=UNLOAD, headers=headers, timeout=30
        )
        error = envelope(refused, 403)
        assert error["code"] == "origin_not_allowed" and "allowed_origins" in error["message"]
        assert "access-control-allow-origin" not in refused.headers
    for path in ("/models/unload", "/models/load"):
        refused = httpx.post(f"{local.neuron_url}{path}", json=UNLOAD, headers=page, timeout=30)
        assert envelope(refused, 403)["code"] == "origin_not_allowed"
    chat = httpx.post(f"{local.base}/v1/chat/completions", json=CHAT, headers=page, timeout=30)
    assert envelope(chat, 403)["code"] == "origin_not_allowed"
    messages = httpx.post(f"{local.base}/v1/messages", json=MESSAGE, headers=page, timeout=30)
    assert messages.status_code == 403
    assert messages.json()["type"] == "error"  # the Anthropic envelope on its routes
    assert messages.json()["error"]["type"] == "permission_error"
    assert TINY_REPO_ID in local.loaded()  # still there


def test_dns_rebinding_fails(local: Local) -> None:
    """A page whose own name resolves to 127.0.0.1 is same-origin with the daemon: its
    requests carry that name as Host."""
    for base, path in (
        (local.base, "/admin/fleet"),
        (local.base, "/v1/models"),
        (local.neuron_url, "/models"),
        (local.neuron_url, "/discovery"),
    ):
        rebound = {"host": f"evil.example:{port_of(base)}"}
        error = envelope(httpx.get(f"{base}{path}", headers=rebound, timeout=10), 421)
        assert error["code"] == "host_not_allowed" and "allowed_hosts" in error["message"]
    unload = httpx.post(
        f"{local.base}/admin/models/unload",
        json=UNLOAD,
        headers={"host": "evil.example", "origin": "http://evil.example"},
        timeout=30,
    )
    assert unload.status_code == 421
    answer = httpx.post(
        f"{local.base}/v1/messages", json=MESSAGE, headers={"host": "evil.example"}, timeout=30
    )
    assert answer.status_code == 421 and answer.json()["type"] == "error"
    assert TINY_REPO_ID in local.loaded()
    assert "unknown host name refused" in local.neuron.log()


def test_its_own_names_are_fine(local: Local) -> None:
    port = port_of(local.base)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "gateway.example", "10.9.8.7:1"):
        response = httpx.get(f"{local.base}/v1/models", headers={"host": host}, timeout=10)
        assert response.status_code == 200, host
    # A page cortex itself served (its own origin) may call it.
    same = {"origin": f"http://127.0.0.1:{port}"}
    response = httpx.post(f"{local.base}/v1/chat/completions", json=CHAT, headers=same, timeout=60)
    assert response.status_code == 200, response.text


def test_json_routes_want_json(local: Local) -> None:
    raw = b'{"model": "' + TINY_REPO_ID.encode() + b'", "messages": []}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):  # curl -d
        headers = {"content-type": content_type}
        for url in (
            f"{local.base}/v1/chat/completions",
            f"{local.base}/admin/models/unload",
            f"{local.neuron_url}/v1/chat/completions",
            f"{local.neuron_url}/models/unload",
        ):
            refused = httpx.post(url, content=raw, headers=headers, timeout=30)
            error = envelope(refused, 415)
            assert error["code"] == "unsupported_media_type", url
            assert "application/json" in error["message"]
        messages = httpx.post(f"{local.base}/v1/messages", content=raw, headers=headers)
        assert messages.status_code == 415
        assert messages.json()["error"]["type"] == "invalid_request_error"  # Anthropic's
    assert TINY_REPO_ID in local.loaded()
    for content_type in ("application/json; charset=utf-8", "application/vnd.x+json"):
        response = httpx.post(
            f"{local.base}/v1/chat/completions",
            json=CHAT,
            headers={"content-type": content_type},
            timeout=60,
        )
        assert response.status_code == 200, (content_type, response.text)


def test_curl_and_the_sdks_are_unaffected(local: Local) -> None:
    """What the README and the ``cortex up`` banner tell people to run."""
    if shutil.which("curl"):
        body = (
            '{"model": "' + TINY_REPO_ID + '", "max_tokens": 2, '
            '"messages": [{"role": "user", "content": "hi"}]}'
        )
        url = f"{local.base}/v1/chat/completions"
        curl = ["curl", "-s", url, "-H", "content-type: application/json", "-d", body]
        done = subprocess.run(
            curl,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert '"choices"' in done.stdout, done.stdout + done.stderr
    for base in (local.base, f"http://localhost:{port_of(local.base)}"):
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        sdk.chat.completions.create(model=TINY_REPO_ID, max_tokens=2, messages=CHAT["messages"])
        claude = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
        claude.messages.create(model="claude-test", max_tokens=2, messages=CHAT["messages"])


def test_cors_for_the_configured_origin_only(local: Local) -> None:
    preflight = httpx.options(
        f"{local.base}/v1/chat/completions",
        headers={
            "origin": APP,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == APP
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
    answer = httpx.post(
        f"{local.base}/v1/chat/completions", json=CHAT, headers={"origin": APP}, timeout=60
    )
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == APP
    listed = httpx.get(f"{local.base}/v1/models", headers={"origin": APP})
    assert listed.headers["access-control-allow-origin"] == APP
    # Others get no preflight, and no header that would let them read an answer.
    evil = {"origin": EVIL, "access-control-request-method": "POST"}
    assert httpx.options(f"{local.base}/v1/chat/completions", headers=evil).status_code == 403
    read = httpx.get(f"{local.base}/v1/models", headers={"origin": EVIL})
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
    # The neuron has no origins configured: CORS is off.
    off = httpx.options(f"{local.neuron_url}/v1/chat/completions", headers={**evil, "origin": APP})
    assert off.status_code == 403 and "access-control-allow-origin" not in off.headers


def test_refusals_are_logged_and_counted(local: Local) -> None:
    httpx.post(f"{local.base}/v1/chat/completions", json=CHAT, headers={"origin": EVIL})
    httpx.get(f"{local.base}/v1/models", headers={"host": "evil.example"})
    text = httpx.get(f"{local.metrics}/metrics").text
    assert 'reason="origin_not_allowed"' in text and 'reason="host_not_allowed"' in text
    log = local.cortex.log()
    assert "status=403" in log and "error=origin_not_allowed" in log


def test_a_neuron_beyond_loopback_answers_to_its_own_hostname(
    tmp_path: Path, hf_cache: Path
) -> None:
    """cortex reaches a neuron by the name in its endpoint URL (http://gpu-box:13131): a
    neuron listening on 0.0.0.0 knows its hostname, not other names."""
    token = "t-" + "k" * 30
    port = free_port()
    config = tmp_path / "neuron.toml"
    config.write_text(f'host = "0.0.0.0"\nport = {port}\ntoken = "{token}"\nkeepalive_s = 1.0\n')
    daemon = Daemon(
        [console_script("neuron"), "--config", str(config)],
        log_path=tmp_path / "neuron.log",
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache)},
    ).start()
    try:
        daemon.wait_http(f"http://127.0.0.1:{port}/health")
        auth = {"authorization": f"Bearer {token}"}
        for host in (socket.gethostname(), socket.getfqdn(), "127.0.0.1", "localhost"):
            response = httpx.get(
                f"http://127.0.0.1:{port}/models", headers={**auth, "host": f"{host}:{port}"}
            )
            assert response.status_code == 200, (host, response.text)
        rebound = {**auth, "host": f"evil.example:{port}"}
        assert httpx.get(f"http://127.0.0.1:{port}/models", headers=rebound).status_code == 421
    finally:
        daemon.stop()
