"""API keys and the admin token on cortex (§2.8.1): the decisions as pure functions, the
keys file, then a real cortex (in front of the scripted neuron) with keys made by the real
``cortex keys`` CLI, called with the official OpenAI and Anthropic SDKs."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai
import orjson
import pytest
from prometheus_client import generate_latest

from helexa.core.auth import ApiKey, KeyRing, hash_key
from helexa.core.settings import ConfigError
from helexa.cortex import keys as keys_module
from helexa.cortex.auth import (
    ADMIN_KEY_NAME,
    anthropic_envelope,
    decide,
    error_body,
    model_allowed,
    require_model,
    visible,
)
from helexa.cortex.keys import KeyStore, add_key, keys_path, read_keys, render_keys, revoke_key
from helexa.cortex.metrics import Metrics
from tests.cortex.conftest import Fleet
from tests.support.fleet import start_cortex
from tests.support.procs import Daemon, console_script

# --- decisions ------------------------------------------------------------------------------

RING = KeyRing(
    [
        ApiKey("full", hash_key("k-full")),
        ApiKey("narrow", hash_key("k-narrow"), models=frozenset({"org/model"})),
    ]
)


def test_open_without_keys_or_admin_token() -> None:
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/models", "/admin/fleet", "/x"):
        verdict = decide(path, None, None, None)
        assert verdict.denial is None and verdict.key is None
    assert decide("/admin/models/load", None, None, None).denial is None


def test_api_routes_need_a_key_once_keys_are_configured() -> None:
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/models", "/nowhere"):
        missing = decide(path, None, RING, None).denial
        assert missing is not None and missing.status == 401
        assert missing.code == "missing_credentials"
        wrong = decide(path, "k-wrong", RING, None).denial
        assert wrong is not None and wrong.status == 401 and wrong.code == "invalid_api_key"
    ok = decide("/v1/messages", "k-narrow", RING, None)
    assert ok.denial is None and ok.key == "narrow" and ok.models == {"org/model"}
    assert decide("/v1/models", "k-full", RING, None).models is None
    # Bearer and x-api-key both sent (Claude Code signed in elsewhere): either may be the key.
    assert decide("/v1/messages", ("oauth-token", "k-full"), RING, None).key == "full"
    assert decide("/v1/messages", (), RING, None).denial.code == "missing_credentials"  # type: ignore[union-attr]
    # An empty keys file is configured: it refuses everything, it never opens the gateway.
    assert decide("/v1/chat/completions", "k-full", KeyRing(), None).denial is not None
    # The admin token is not an API key.
    assert decide("/v1/chat/completions", "adm", RING, "adm").denial is not None
    for path in ("/health", "/"):
        assert decide(path, None, RING, "adm").denial is None


def test_admin_routes() -> None:
    lifecycle = "/admin/models/load"
    # The admin token opens every admin route, and is named on the log line.
    for path in (lifecycle, "/admin/models/unload", "/admin/fleet"):
        verdict = decide(path, "adm", RING, "adm")
        assert verdict.denial is None and verdict.key == ADMIN_KEY_NAME
        assert decide(path, None, RING, "adm").denial.status == 401  # type: ignore[union-attr]
        assert decide(path, "nope", None, "adm").denial.status == 401  # type: ignore[union-attr]
    # /admin/fleet (read-only: cortex status) takes an unrestricted API key too; the
    # lifecycle does not. A key restricted to some models must not see every model and
    # neuron there.
    assert decide("/admin/fleet", "k-full", RING, None).denial is None
    assert decide("/admin/fleet", "k-full", RING, "adm").key == "full"
    narrow = decide("/admin/fleet", "k-narrow", RING, "adm")
    assert narrow.key == "narrow" and narrow.denial is not None
    assert narrow.denial.status == 403 and narrow.denial.code == "admin_only"
    refused = decide(lifecycle, "k-full", RING, "adm").denial
    assert refused is not None and refused.status == 403 and refused.code == "admin_only"
    # Keys but no admin token: nobody may load or unload through cortex.
    nobody = decide(lifecycle, "k-full", RING, None).denial
    assert nobody is not None and nobody.status == 403 and "admin_token" in nobody.message
    assert decide(lifecycle, None, RING, None).denial.status == 401  # type: ignore[union-attr]
    # An admin token alone guards /admin/* but leaves the API open.
    assert decide("/admin/fleet", None, None, "adm").denial.status == 401  # type: ignore[union-attr]
    assert decide("/v1/chat/completions", None, None, "adm").denial is None


def test_error_envelopes() -> None:
    anthropic_version = [(b"anthropic-version", b"2023-06-01")]
    assert anthropic_envelope("/v1/messages", [])
    assert anthropic_envelope("/v1/messages/count_tokens", [])
    assert anthropic_envelope("/v1/models", anthropic_version)
    assert anthropic_envelope("/v1/models/org/model", anthropic_version)
    assert not anthropic_envelope("/v1/models", [])
    assert not anthropic_envelope("/v1/chat/completions", anthropic_version)
    assert not anthropic_envelope("/admin/fleet", [])
    denial = decide("/v1/messages", None, RING, None).denial
    assert denial is not None
    as_anthropic = orjson.loads(error_body(denial.error(), True))
    assert as_anthropic["type"] == "error"
    assert as_anthropic["error"]["type"] == "authentication_error"
    as_openai = orjson.loads(error_body(denial.error(), False))
    assert as_openai["error"]["type"] == "authentication_error"
    assert as_openai["error"]["code"] == "missing_credentials"


def test_model_allowlist() -> None:
    allow = frozenset({"org/model", "helexa/fast"})
    assert model_allowed(None, "anything")
    assert model_allowed(allow, "org/model", "org/model")
    assert model_allowed(allow, "claude-sonnet", "org/model")  # a name resolved into it
    assert model_allowed(allow, "helexa/fast", "org/other")  # the alias itself is listed
    assert not model_allowed(allow, "org/other", "org/other")
    require_model(allow, "claude-x", "org/model")  # resolved into an allowed one
    require_model(allow, "helexa/fast", "org/x", ["helexa/fast"])  # an allowed alias of it
    require_model(frozenset({"claude-*"}), "claude-x", "org/y", ["claude-*"])  # its pattern
    with pytest.raises(Exception) as fallback:  # allowed name, but a fallback took it elsewhere
        require_model(allow, "org/model", "org/fallback-target", [])
    assert fallback.value.status == 403  # type: ignore[attr-defined]
    with pytest.raises(Exception) as caught:
        require_model(allow, "org/other", "org/other", ["org/other"])
    error = caught.value
    assert error.status == 403 and error.type == "permission_error"  # type: ignore[attr-defined]
    entries = [
        {"id": "org/model"},
        {"id": "org/other"},
        {"id": "helexa/default", "alias_of": "org/model"},
        {"id": "helexa/big", "alias_of": "org/other"},
        {"id": "claude-*", "fallback_for": "org/model"},
    ]
    assert [e["id"] for e in visible(entries, allow)] == [
        "org/model",
        "helexa/default",
        "claude-*",
    ]
    assert visible(entries, None) == entries


# --- the keys file ----------------------------------------------------------------------------


def test_keys_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "keys.toml"
    assert read_keys(path) == []
    secret = add_key(path, "alice", None)
    narrow = add_key(path, "bob@team", ["org/model", ' "quoted" ', ""])
    text = path.read_text()
    assert secret not in text and narrow not in text and hash_key(secret) in text
    keys = {k.name: k for k in read_keys(path)}
    assert keys["alice"].models is None and keys["alice"].sha256 == hash_key(secret)
    assert keys["bob@team"].models == {"org/model", '"quoted"'}
    assert keys["alice"].created.endswith("Z")
    with pytest.raises(ValueError, match="exists"):
        add_key(path, "alice", None)
    for bad in ("", "has space", ":admin", "a" * 65, "ünï"):
        with pytest.raises(ValueError, match="key name"):
            add_key(path, bad, None)
    with pytest.raises(ValueError, match="not a model name"):
        add_key(path, "carol", ["two words"])
    os.chmod(path, 0o600)
    assert revoke_key(path, "alice") and not revoke_key(path, "alice")
    assert [k.name for k in read_keys(path)] == ["bob@team"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"  # kept across the atomic rewrite
    left = sorted(p.name for p in path.parent.iterdir())
    assert left == [".keys.toml.lock", "keys.toml"]  # no temp file left behind
    assert render_keys(read_keys(path)) == path.read_text()
    path.write_text('[[keys]]\nname = "x"\nsha256 = "not-a-hash"\n')
    with pytest.raises(ConfigError, match="sha256"):
        read_keys(path)
    assert keys_path(None, tmp_path / "cortex.toml") is None
    assert keys_path(Path("k.toml"), tmp_path / "cortex.toml") == tmp_path / "k.toml"
    assert keys_path(Path("/abs/k.toml"), tmp_path / "cortex.toml") == Path("/abs/k.toml")


def test_key_store_reloads_on_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(keys_module.time, "monotonic", lambda: clock[0])
    assert KeyStore(None).ring() is None and not KeyStore(None).enabled  # open
    literal = KeyStore(None, "hx-literal").ring()
    assert literal is not None and literal.find("hx-literal").name == ":env"  # type: ignore[union-attr]

    path = tmp_path / "keys.toml"
    store = KeyStore(path)  # configured, no file yet: closed, not open
    ring = store.ring()
    assert store.enabled and ring is not None and len(ring) == 0
    secret = add_key(path, "alice", None)
    assert store.ring().find(secret) is None  # type: ignore[union-attr]  # not looked at yet
    clock[0] += 1.1
    assert store.ring().find(secret).name == "alice"  # type: ignore[union-attr]
    path.write_text("not toml [")  # a bad edit keeps the keys read before
    clock[0] += 1.1
    assert store.ring().find(secret) is not None  # type: ignore[union-attr]
    path.unlink()  # a deleted file refuses everything
    clock[0] += 1.1
    assert len(store.ring()) == 0  # type: ignore[arg-type]


# --- a real cortex ----------------------------------------------------------------------------

ADMIN_TOKEN = "adm-" + "x" * 20
CHAT = {"model": "helexa/default", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Gated:
    cortex: Daemon
    base: str
    metrics: str
    config: Path
    keys: dict[str, str]

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [console_script("cortex"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **(env or {})},
        )

    def add(self, name: str, *extra: str) -> str:
        done = self.cli("keys", "add", name, *extra, "--config", str(self.config))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, scripted: Fleet) -> Iterator[Gated]:
    """A cortex with a keys file (empty at start) and an admin token, in front of the
    scripted neuron of the ``scripted`` fleet."""
    work = tmp_path_factory.mktemp("gated")
    models = (
        '[[models]]\nid = "scripted/qwen"\nvram_mb = 1\nmin_devices = 0\n'
        '[[models]]\nid = "other/model"\nvram_mb = 1\nmin_devices = 0\n'
        '[aliases]\n"helexa/default" = "scripted/qwen"\n'
        '[fallbacks]\n"claude-*" = "scripted/qwen"\n'
    )
    extra = f'admin_token = "{ADMIN_TOKEN}"\n[auth]\nkeys_file = "keys.toml"\n'
    url = scripted.neurons["scripted"][1]
    cortex, base, metrics = start_cortex(work, {"scripted": url}, models, extra=extra, name="gate")
    gate = Gated(cortex, base, metrics, work / "gate.toml", {})
    gate.keys["full"] = gate.add("full")
    gate.keys["narrow"] = gate.add("narrow", "--models", "scripted/qwen")
    gate.keys["doomed"] = gate.add("doomed")
    bearer = {"authorization": f"Bearer {gate.keys['doomed']}"}
    # The running cortex picks the new keys up by itself.
    eventually(lambda: httpx.get(f"{base}/v1/models", headers=bearer).status_code == 200)
    yield gate
    cortex.stop()


def test_open_routes_stay_open(gated: Gated) -> None:
    for path in ("/health", "/"):
        assert httpx.get(gated.base + path).status_code == 200
    assert "open to anyone" not in gated.cortex.log()  # keys are configured: no warning


def test_no_or_wrong_key_is_401_in_each_protocols_envelope(gated: Gated) -> None:
    raw = httpx.post(f"{gated.base}/v1/chat/completions", json=CHAT)
    assert raw.status_code == 401 and raw.headers["www-authenticate"] == "Bearer"
    assert raw.json()["error"]["code"] == "missing_credentials"

    sdk = openai.OpenAI(base_url=f"{gated.base}/v1", api_key="hx-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk.chat.completions.create(model="helexa/default", messages=CHAT["messages"])
    assert caught.value.response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()

    claude = anthropic.Anthropic(base_url=gated.base, api_key="hx-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        claude.messages.create(model="claude-test", max_tokens=16, messages=CHAT["messages"])
    body = denied.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.count_tokens(model="claude-test", messages=CHAT["messages"])
    with pytest.raises(anthropic.AuthenticationError):
        claude.models.list()  # /v1/models with anthropic-version: Anthropic's envelope


def test_bearer_and_x_api_key_both_work(gated: Gated) -> None:
    key = gated.keys["full"]
    sdk = openai.OpenAI(base_url=f"{gated.base}/v1", api_key=key, max_retries=0)  # Bearer
    answer = sdk.chat.completions.create(model="helexa/default", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "No tools, plain answer."
    claude = anthropic.Anthropic(base_url=gated.base, api_key=key, max_retries=0)  # x-api-key
    message = claude.messages.create(
        model="claude-whatever", max_tokens=16, messages=CHAT["messages"]
    )
    assert message.content[0].text == "No tools, plain answer."  # type: ignore[union-attr]
    raw = httpx.post(f"{gated.base}/v1/chat/completions", json=CHAT, headers={"x-api-key": key})
    assert raw.status_code == 200


def test_model_allowlist_through_the_sdks(gated: Gated) -> None:
    key = gated.keys["narrow"]
    sdk = openai.OpenAI(base_url=f"{gated.base}/v1", api_key=key, max_retries=0)
    # Its model by any name that resolves to it: the id, an alias, a fallback.
    for name in ("scripted/qwen", "helexa/default"):
        sdk.chat.completions.create(model=name, messages=CHAT["messages"])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        sdk.chat.completions.create(model="other/model", messages=CHAT["messages"])
    assert caught.value.response.json()["error"]["code"] == "model_not_allowed"
    listed = {m.id for m in sdk.models.list()}
    assert "other/model" not in listed and {"scripted/qwen", "helexa/default"} <= listed
    full = openai.OpenAI(base_url=f"{gated.base}/v1", api_key=gated.keys["full"], max_retries=0)
    assert "other/model" in {m.id for m in full.models.list()}

    claude = anthropic.Anthropic(base_url=gated.base, api_key=key, max_retries=0)
    claude.messages.create(model="claude-anything", max_tokens=16, messages=CHAT["messages"])
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        claude.messages.create(model="other/model", max_tokens=16, messages=CHAT["messages"])
    assert denied.value.response.json()["error"]["type"] == "permission_error"
    assert httpx.get(f"{gated.base}/v1/models/scripted/qwen", headers={"x-api-key": key}).is_success
    assert httpx.get(
        f"{gated.base}/v1/models/helexa/default", headers={"x-api-key": key}
    ).is_success


def test_a_model_outside_the_allowlist_does_not_exist_for_the_key(gated: Gated) -> None:
    """As OpenAI answers: 404, the answer for a model that does not exist, in either
    protocol's envelope — also for a listed name that a fallback maps to another model."""
    narrow = {"x-api-key": gated.keys["narrow"]}
    unknown = httpx.get(f"{gated.base}/v1/models/no/such-model", headers=narrow)
    assert unknown.status_code == 404
    hidden = httpx.get(f"{gated.base}/v1/models/other/model", headers=narrow)
    assert hidden.status_code == 404
    assert hidden.json()["error"] == {
        **unknown.json()["error"],
        "message": "model 'other/model' does not exist",
    }
    as_anthropic = httpx.get(
        f"{gated.base}/v1/models/other/model",
        headers={**narrow, "anthropic-version": "2023-06-01"},
    )
    assert as_anthropic.status_code == 404
    assert as_anthropic.json()["error"]["type"] == "not_found_error"
    # "claude-x" is listed, but the fallback takes it to scripted/qwen, which is not: a
    # request for it is refused (require_model), and so is its model entry.
    listed = {"x-api-key": gated.add("listed-name", "--models", "claude-x")}
    eventually(lambda: httpx.get(f"{gated.base}/v1/models", headers=listed).status_code == 200)
    chat = httpx.post(
        f"{gated.base}/v1/chat/completions", json={**CHAT, "model": "claude-x"}, headers=listed
    )
    assert chat.status_code == 403
    assert httpx.get(f"{gated.base}/v1/models/claude-x", headers=listed).status_code == 404


def test_revoked_key_is_refused_without_restart(gated: Gated) -> None:
    doomed = {"authorization": f"Bearer {gated.keys['doomed']}"}
    assert httpx.get(f"{gated.base}/v1/models", headers=doomed).status_code == 200
    done = gated.cli("keys", "revoke", "doomed", "--config", str(gated.config))
    assert done.returncode == 0, done.stderr
    eventually(lambda: httpx.get(f"{gated.base}/v1/models", headers=doomed).status_code == 401)
    again = gated.cli("keys", "revoke", "doomed", "--config", str(gated.config))
    assert again.returncode == 1 and "no key named" in again.stderr


def test_admin_routes_are_guarded(gated: Gated) -> None:
    fleet = f"{gated.base}/admin/fleet"
    assert httpx.get(fleet).status_code == 401
    assert httpx.get(fleet, headers={"authorization": "Bearer nope"}).status_code == 401
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(fleet, headers=admin).status_code == 200
    assert httpx.get(fleet, headers={"x-api-key": gated.keys["full"]}).status_code == 200
    restricted = httpx.get(fleet, headers={"x-api-key": gated.keys["narrow"]})
    assert restricted.status_code == 403 and "scripted" not in restricted.text
    load = f"{gated.base}/admin/models/load"
    body = {"model_id": "scripted/qwen"}
    assert httpx.post(load, json=body).status_code == 401
    user = {"authorization": f"Bearer {gated.keys['full']}"}
    assert httpx.post(load, json=body, headers=user).status_code == 403
    assert httpx.post(load, json=body, headers=admin, timeout=30).status_code == 200
    # cortex status sends a key from --key or CORTEX_API_KEY.
    endpoint = ["--endpoint", gated.base, "--json"]
    refused = gated.cli("status", *endpoint)
    assert refused.returncode == 1 and "CORTEX_API_KEY" in refused.stderr
    shown = gated.cli("status", *endpoint, env={"CORTEX_API_KEY": gated.keys["full"]})
    assert shown.returncode == 0 and orjson.loads(shown.stdout)["nodes"]["total"] == 1


def test_keys_list_and_cli_errors(gated: Gated, tmp_path: Path) -> None:
    listed = gated.cli("keys", "list", "--config", str(gated.config))
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert any(line.startswith("full ") and "(all models)" in line for line in lines)
    assert any(line.startswith("narrow ") and "scripted/qwen" in line for line in lines)
    assert not any(line.startswith("doomed") for line in lines)
    stored = (gated.config.parent / "keys.toml").read_text()
    for key in gated.keys.values():
        assert key not in listed.stdout and key not in stored and hash_key(key) not in listed.stdout
    dupe = gated.cli("keys", "add", "full", "--config", str(gated.config))
    assert dupe.returncode == 1 and "exists" in dupe.stderr
    bare = tmp_path / "bare.toml"
    bare.write_text("[gateway]\n")
    unset = gated.cli("keys", "add", "x", "--config", str(bare))
    assert unset.returncode == 2 and "keys_file" in unset.stderr


def test_key_names_on_the_access_log_and_metrics(gated: Gated) -> None:
    key = gated.keys["full"]
    httpx.post(f"{gated.base}/v1/chat/completions", json=CHAT, headers={"x-api-key": key})
    eventually(
        lambda: any(
            "msg=request" in line and "path=/v1/chat/completions" in line and "key=full" in line
            for line in gated.cortex.log().splitlines()
        )
    )
    log = gated.cortex.log()
    assert "key=:admin" in log  # the admin token is named too
    for secret in gated.keys.values():
        assert secret not in log
    assert "error=missing_credentials" in log
    # Not on the metrics port, which anyone who can reach it reads: unless configured.
    text = httpx.get(f"{gated.metrics}/metrics").text
    assert "cortex_requests_by_key" not in text and 'key="full"' not in text
    assert "cortex_requests_total" in text


def test_key_names_on_the_metrics_port_when_configured() -> None:
    metrics = Metrics(key_names=True)
    metrics.by_key("alice")
    text = generate_latest(metrics.registry).decode()
    assert 'cortex_requests_by_key_total{key="alice"} 1.0' in text
    quiet = Metrics()
    quiet.by_key("alice")
    assert "alice" not in generate_latest(quiet.registry).decode()


def test_repeated_credentials_are_refused(gated: Gated) -> None:
    """Two different Authorization (or x-api-key) headers: which one counts is not for the
    client to leave to a proxy or to the daemon's header parsing."""
    full, narrow = gated.keys["full"], gated.keys["narrow"]
    for name, one, other in (
        ("authorization", f"Bearer {narrow}", f"Bearer {full}"),
        ("x-api-key", narrow, full),
    ):
        headers = [(name, one), (name, other)]
        refused = httpx.post(f"{gated.base}/v1/chat/completions", json=CHAT, headers=headers)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "ambiguous_credentials"
        assert httpx.get(f"{gated.base}/admin/fleet", headers=headers).status_code == 400
        same = [(name, other), (name, other)]  # the same one twice is not ambiguous
        assert httpx.post(f"{gated.base}/v1/chat/completions", json=CHAT, headers=same).is_success
    # One of each (Claude Code signed in elsewhere sends both): either may be the key.
    both = {"authorization": "Bearer elsewhere", "x-api-key": full}
    assert httpx.post(f"{gated.base}/v1/chat/completions", json=CHAT, headers=both).is_success
    messages = httpx.post(
        f"{gated.base}/v1/messages",
        json={**CHAT, "max_tokens": 5},
        headers=[("x-api-key", full), ("x-api-key", narrow)],
    )
    assert messages.status_code == 400 and messages.json()["type"] == "error"
    open_route = httpx.get(f"{gated.base}/health", headers=[("x-api-key", "a"), ("x-api-key", "b")])
    assert open_route.status_code == 200


def test_a_cortex_without_keys_is_open_and_says_so_once(scripted: Fleet) -> None:
    assert httpx.get(f"{scripted.base}/v1/models").status_code == 200
    assert httpx.get(f"{scripted.base}/admin/fleet").status_code == 200
    assert scripted.cortex.log().count("the API is open to anyone") == 1
