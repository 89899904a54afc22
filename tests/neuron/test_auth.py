"""The neuron's shared token (§2.8.1): every route but /health wants it; a neuron that would
listen beyond loopback without one refuses to start; cortex sends it on every request."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helexa.core.settings import ConfigError, load_settings
from helexa.neuron.config import NeuronSettings, unguarded_listen
from helexa.up.tiny_model import TINY_REPO_ID
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, console_script, free_port, start_neuron

TOKEN = "neuron-" + "s" * 24
CHAT = {
    "model": TINY_REPO_ID,
    "max_tokens": 4,
    "temperature": 0,
    "messages": [{"role": "user", "content": "hi"}],
}


def settings(**values: object) -> NeuronSettings:
    return load_settings(NeuronSettings, None, values)


def test_which_configurations_may_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEURON_TOKEN", raising=False)
    monkeypatch.delenv("NEURON_ADMIN_TOKEN", raising=False)
    for host in ("127.0.0.1", "::1", "localhost"):
        assert unguarded_listen(settings(host=host)) is None
    for host in ("0.0.0.0", "::", "10.0.0.7", "beast.internal"):
        problem = unguarded_listen(settings(host=host))
        assert problem is not None and "token" in problem and "NEURON_TOKEN" in problem
        assert unguarded_listen(settings(host=host, token="t")) is None
    assert unguarded_listen(settings(host="0.0.0.0", token="")) is not None  # empty: none
    # Whitespace alone is no token either, and says so rather than passing for one.
    for blank in (" ", "  \t ", "\n"):
        with pytest.raises(ConfigError, match=r"token.*whitespace"):
            settings(host="0.0.0.0", token=blank)
        with pytest.raises(ConfigError, match="whitespace"):
            settings(admin_token=blank)
    assert settings(token=" t0k \n").token == "t0k"  # compared as a header's value is
    # The old name still works, as the token.
    assert settings(admin_token="old").token == "old"
    assert settings(admin_token="old", token="new").token == "new"
    monkeypatch.setenv("NEURON_TOKEN", "from-env")
    assert settings(host="0.0.0.0").token == "from-env"


def test_refuses_to_start_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text("keepalive_s = 1.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}
    # It exits before binding anything: no traffic, no exposure.
    done = subprocess.run(
        [
            console_script("neuron"),
            "--config",
            str(config),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to start" in done.stderr and "token" in done.stderr
    assert "neuron_token" in done.stderr  # names what cortex needs too
    blank = subprocess.run(
        [console_script("neuron"), "--config", str(config), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "NEURON_TOKEN": "   "},
    )
    assert blank.returncode == 2, blank.stderr
    assert "token" in blank.stderr and "whitespace" in blank.stderr


@pytest.fixture(scope="module")
def tokened(
    tmp_path_factory: pytest.TempPathFactory, hf_cache: Path
) -> Iterator[tuple[str, str, Daemon, Daemon]]:
    """A neuron with a token (the tiny model pre-warmed) and a cortex that sends it."""
    work = tmp_path_factory.mktemp("tokened")
    neuron, url = start_neuron(
        work,
        f'token = "{TOKEN}"\nkeepalive_s = 0.5\n[[default_models]]\nmodel_id = "{TINY_REPO_ID}"\n',
        hf_cache=hf_cache,
        name="tokened",
    )
    models = f'[[models]]\nid = "{TINY_REPO_ID}"\nvram_mb = 60\nmin_devices = 0\n'
    cortex, base, _metrics = start_cortex(
        work, {"tokened": url}, models, extra=f'neuron_token = "{TOKEN}"\n'
    )
    yield url, base, neuron, cortex
    cortex.stop()
    neuron.stop()


def test_every_route_but_health_wants_the_token(tokened: tuple[str, str, Daemon, Daemon]) -> None:
    url, _base, neuron, _cortex = tokened
    assert httpx.get(f"{url}/health").status_code == 200
    good = {"authorization": f"Bearer {TOKEN}"}
    for wrong in ({}, {"authorization": "Bearer nope"}, {"authorization": TOKEN}):
        for path in ("/models", "/discovery", "/v1/models", f"/models/{TINY_REPO_ID}/endpoint"):
            denied = httpx.get(url + path, headers=wrong)
            assert denied.status_code == 401, path
            assert denied.json()["error"]["type"] == "authentication_error"
        chat = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=wrong)
        assert chat.status_code == 401
        load = httpx.post(f"{url}/models/load", json={"model_id": TINY_REPO_ID}, headers=wrong)
        assert load.status_code == 401
    assert [m["id"] for m in httpx.get(f"{url}/models", headers=good).json()] == [TINY_REPO_ID]
    # The token and another in a second header: refused, whichever comes first.
    for pair in ((f"Bearer {TOKEN}", "Bearer nope"), ("Bearer nope", f"Bearer {TOKEN}")):
        twice = [("authorization", pair[0]), ("authorization", pair[1])]
        refused = httpx.get(f"{url}/models", headers=twice)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "ambiguous_credentials"
    keys = [("x-api-key", TOKEN), ("x-api-key", "nope")]
    assert httpx.get(f"{url}/models", headers=keys).status_code == 400
    same = [("authorization", f"Bearer {TOKEN}")] * 2
    assert httpx.get(f"{url}/models", headers=same).status_code == 200
    answer = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=good, timeout=60)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]
    assert TOKEN not in neuron.log()


def test_cortex_sends_the_token_on_every_request(
    tokened: tuple[str, str, Daemon, Daemon],
) -> None:
    _url, base, _neuron, cortex = tokened
    fleet = httpx.get(f"{base}/admin/fleet").json()  # polls: /discovery, /models, /health
    assert fleet["nodes"] == {"healthy": 1, "total": 1}
    assert [m["id"] for m in fleet["neurons"][0]["models"]] == [TINY_REPO_ID]
    answer = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=60)  # proxied
    assert answer.status_code == 200, answer.text
    streamed = httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=60)
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    # Lifecycle calls (unload, then a cold load through a request) carry it too.
    body = {"model_id": TINY_REPO_ID}
    unloaded = httpx.post(f"{base}/admin/models/unload", json=body, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    again = httpx.post(f"{base}/v1/chat/completions", json=CHAT, timeout=120)
    assert again.status_code == 200, again.text
    assert TOKEN not in cortex.log()
