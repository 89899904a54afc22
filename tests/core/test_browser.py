"""What web pages may ask of a daemon (core.browser, core.http.require_json): the decisions
as pure functions of headers and settings, and what the guard sends, without a server."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from helexa.core import browser
from helexa.core.browser import (
    BrowserGuard,
    HttpSettings,
    answer,
    host_allowed,
    host_name,
    host_names,
    normalize_origin,
    origin_allowed,
    same_origin,
)
from helexa.core.errors import ApiError
from helexa.core.http import content_type_ok, require_json
from helexa.core.settings import ConfigError, load_settings
from helexa.cortex.config import CortexSettings
from helexa.neuron.config import NeuronSettings

LOCAL = host_names("127.0.0.1")


def scope(method: str = "POST", path: str = "/v1/chat/completions", **headers: str) -> Any:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
    }


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:31313", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("gpu-box.lan.:8001", "gpu-box.lan"),
        ("[::1]:13131", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("fe80::1:8001", "fe80::1:8001"),  # unbracketed: the whole is an address
        ("gpu-box:x", None),
        ("[::1]x", None),
        ("", None),
        (":80", None),
    ],
)
def test_host_name(header: str, name: str | None) -> None:
    assert host_name(header) == name


def test_loopback_names_and_ip_literals_are_always_hosts() -> None:
    for header in ("127.0.0.1:1", "localhost:31313", "[::1]:2", "10.0.0.7:13131", "[fe80::2]"):
        assert host_allowed(header, LOCAL), header
    assert host_allowed(None, LOCAL)  # no Host at all (HTTP/1.0 tools): not a browser
    # DNS rebinding: the page's own name, pointed at this machine.
    for header in (
        "evil.example",
        "evil.example:31313",
        "x",
        "localhost.evil.example",
        "a.localhost",
    ):
        assert not host_allowed(header, LOCAL), header
    assert not host_allowed("", LOCAL) and not host_allowed("bad host:1", LOCAL)


def test_listen_address_machine_names_and_configured_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(browser.socket, "gethostname", lambda: "Beast")
    monkeypatch.setattr(browser.socket, "getfqdn", lambda: "beast.internal.")
    # Loopback only: nobody else can reach it, and nobody else's names are needed.
    assert host_names("127.0.0.1") == {"localhost", "127.0.0.1"}
    # Beyond loopback: cortex reaches the neuron by its endpoint URL, e.g. http://beast:13131.
    for listen in ("0.0.0.0", "::", "[::]", "10.0.0.7"):
        names = host_names(listen)
        assert {"beast", "beast.internal"} <= names, listen
        assert host_allowed("beast:13131", names) and host_allowed("BEAST.internal", names)
        assert not host_allowed("evil.example:13131", names)
    assert "gpu.example" in host_names("gpu.example")  # listening on a name: that name
    names = host_names("0.0.0.0", ["gateway.example"])
    assert host_allowed("gateway.example:31313", names)
    assert host_allowed("anything.example", host_names("127.0.0.1", ["*"]))


@pytest.mark.parametrize(
    ("value", "normal"),
    [
        ("http://App.Example:8080", "http://app.example:8080"),
        ("https://app.example:443", "https://app.example"),
        ("http://app.example:80/", "http://app.example"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("null", None),
        ("file://", None),
        ("http://app.example/path", None),
        ("http://user@app.example", None),
        ("http://app.example:99999", None),
        ("", None),
    ],
)
def test_normalize_origin(value: str, normal: str | None) -> None:
    assert normalize_origin(value) == normal


def test_origins() -> None:
    allowed = frozenset({"http://app.example:8080"})
    assert origin_allowed("http://app.example:8080", allowed)
    assert origin_allowed("HTTP://APP.EXAMPLE:8080", allowed)
    assert not origin_allowed("http://app.example", allowed)  # another port: another origin
    assert not origin_allowed("https://app.example:8080", allowed)
    assert not origin_allowed("null", allowed) and not origin_allowed("null", frozenset({"*"}))
    assert origin_allowed("https://anyone.example", frozenset({"*"}))
    # A page the daemon itself served (as named by Host) is its own origin.
    assert same_origin("http://127.0.0.1:31313", "127.0.0.1:31313")
    assert same_origin("http://localhost", "localhost:80")
    assert not same_origin("http://127.0.0.1:31313", "127.0.0.1:31314")
    assert not same_origin("http://evil.example", "127.0.0.1:31313")
    assert not same_origin("null", "127.0.0.1") and not same_origin("http://x", None)


def test_json_content_types() -> None:
    for ok in (
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.api+json",
        None,  # raw HTTP clients; browsers are stopped by Origin and Host
    ):
        assert content_type_ok(ok), ok
    for bad in (
        "text/plain",
        "text/plain; charset=utf-8",
        "application/x-www-form-urlencoded",  # curl -d without -H
        "multipart/form-data; boundary=x",
        "text/json",
        "application/jsonp",
        "",
    ):
        assert not content_type_ok(bad), bad
    require_json(scope(content_type="application/json"))
    require_json(scope())
    for headers in ({"content_type": "text/plain"},):
        with pytest.raises(ApiError) as info:
            require_json(scope(**headers))
        error = info.value
        assert error.status == 415 and error.code == "unsupported_media_type"
        assert "application/json" in error.message and "text/plain" in error.message
    twice = scope()
    twice["headers"] = [(b"content-type", b"application/json"), (b"content-type", b"text/plain")]
    with pytest.raises(ApiError):
        require_json(twice)


def test_the_guard_refuses_foreign_pages_and_names() -> None:
    guard = BrowserGuard("127.0.0.1")
    local = {"host": "127.0.0.1:31313"}
    assert guard.screen(scope(**local)) == browser.PASS  # curl, the SDKs, Claude Code
    assert (
        guard.screen(scope(host="localhost:31313", origin="http://localhost:31313")).error is None
    )
    evil = guard.screen(scope(**local, origin="http://evil.example"))
    assert evil.error is not None and evil.error.status == 403
    assert evil.error.code == "origin_not_allowed" and "allowed_origins" in evil.error.message
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        assert guard.screen(scope(method, **local, origin="http://evil.example")).error
    assert guard.screen(scope(**local, origin="null")).error  # sandboxed pages, file://
    # A page may fire a GET it cannot read: no CORS headers, so it reads nothing.
    read = guard.screen(scope("GET", "/admin/fleet", **local, origin="http://evil.example"))
    assert read == browser.PASS
    rebound = guard.screen(scope("GET", "/admin/fleet", host="evil.example:31313"))
    assert rebound.error is not None and rebound.error.status == 421
    assert "allowed_hosts" in rebound.error.message and rebound.error.code == "host_not_allowed"
    twice = scope(**local)
    twice["headers"] += [(b"host", b"evil.example")]
    assert guard.screen(twice).error.status == 400  # type: ignore[union-attr]


def test_cors_only_for_configured_origins() -> None:
    settings = HttpSettings(allowed_origins=["http://app.example:8080"])
    guard = BrowserGuard("127.0.0.1", settings)
    app = "http://app.example:8080"
    preflight = guard.screen(
        scope(
            "OPTIONS",
            host="127.0.0.1:31313",
            origin=app,
            access_control_request_method="POST",
            access_control_request_headers="authorization, content-type, x-api-key",
        )
    )
    assert preflight.preflight and preflight.error is None
    headers = dict(preflight.cors)
    assert headers[b"access-control-allow-origin"] == app.encode()
    assert b"POST" in headers[b"access-control-allow-methods"]
    assert headers[b"access-control-allow-headers"] == b"authorization, content-type, x-api-key"
    served = guard.screen(scope(host="127.0.0.1:31313", origin=app))
    assert (
        not served.preflight and dict(served.cors)[b"access-control-allow-origin"] == app.encode()
    )
    assert guard.screen(scope(host="127.0.0.1", origin="http://other.example")).error


def run_answer(screen: browser.Screen, path: str = "/v1/messages") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def main() -> None:
        serve = await answer(screen, scope(path=path), send)
        if serve is not None:
            await serve({"type": "http.response.start", "status": 200, "headers": []})

    asyncio.run(main())
    return sent


def test_answers_in_the_routes_envelope_and_adds_cors_headers() -> None:
    refused = run_answer(browser.Screen(error=browser.origin_refused("http://evil.example")))
    assert refused[0]["status"] == 403
    body = orjson.loads(refused[1]["body"])
    assert body["type"] == "error" and body["error"]["type"] == "permission_error"  # Anthropic
    openai = run_answer(browser.Screen(error=browser.host_refused("x")), "/v1/chat/completions")
    assert orjson.loads(openai[1]["body"])["error"]["code"] == "host_not_allowed"
    cors = ((b"access-control-allow-origin", b"http://a.example"),)
    preflight = run_answer(browser.Screen(preflight=True, cors=cors))
    assert preflight[0]["status"] == 204 and preflight[0]["headers"] == list(cors)
    served = run_answer(browser.Screen(cors=cors))
    assert served[0]["status"] == 200 and served[0]["headers"] == list(cors)
    assert run_answer(browser.PASS)[0]["headers"] == []


def test_http_settings_in_both_config_files() -> None:
    settings = HttpSettings(
        allowed_hosts=["GPU-Box.lan.", "[::1]", "*"], allowed_origins=["HTTPS://App.example:443"]
    )
    assert settings.allowed_hosts == ["gpu-box.lan", "::1", "*"]
    assert settings.allowed_origins == ["https://app.example"]
    for bad in ({"allowed_hosts": ["gpu-box:8001"]}, {"allowed_origins": ["app.example"]}):
        with pytest.raises(ValueError):
            HttpSettings(**bad)
    neuron = load_settings(NeuronSettings, None, {"http": {"allowed_hosts": ["beast.internal"]}})
    assert neuron.http.allowed_hosts == ["beast.internal"]
    with pytest.raises(ConfigError, match="allowed_origins"):
        load_settings(CortexSettings, None, {"http": {"allowed_origins": ["null"]}})
    assert load_settings(CortexSettings, None).http == HttpSettings()  # off unless configured
