"""The shared auth check (core.auth): pure functions of headers and settings."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from helexa.core.auth import (
    KEY_PREFIX,
    ApiKey,
    KeyRing,
    TokenGuard,
    bearer,
    check_token,
    credential,
    credentials,
    hash_key,
    is_loopback,
    new_key,
    same_secret,
)


def h(**headers: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]


def test_credential_from_bearer_or_x_api_key() -> None:
    assert credential(h(authorization="Bearer abc")) == "abc"
    assert credential(h(authorization="bearer  abc ")) == "abc"  # scheme is case-insensitive
    assert credential(h(x_api_key="xyz")) == "xyz"
    # Bearer wins over x-api-key; a non-Bearer Authorization falls back to x-api-key.
    assert credential(h(authorization="Bearer abc", x_api_key="xyz")) == "abc"
    assert credential(h(authorization="Basic dXNlcjpwdw==", x_api_key="xyz")) == "xyz"
    assert credential(h(authorization="Basic dXNlcjpwdw==")) is None
    assert credential(h(authorization="Bearer ")) is None  # the OpenAI SDK with api_key=""
    assert credential(h(x_api_key="")) is None
    assert credential(h(content_type="application/json")) is None
    both = h(authorization="Bearer oauth-of-another-service", x_api_key="xyz")
    assert credentials(both) == ("oauth-of-another-service", "xyz")
    assert credentials(h()) == ()
    assert check_token(both, "xyz") is None  # either one may be the token
    assert bearer("t0k") == [(b"authorization", b"Bearer t0k")]
    assert bearer(None) == [] and bearer("") == []


def test_secrets_compare_in_constant_time_by_digest() -> None:
    assert same_secret("s3cret", "s3cret")
    assert not same_secret("s3cret!", "s3cret")
    assert not same_secret("", "s3cret")
    assert not same_secret(None, "s3cret")
    assert same_secret(("other", "s3cret"), "s3cret") and not same_secret((), "s3cret")
    assert not same_secret("é", "e")  # non-ASCII is fine (compare_digest on bytes)


def test_keys_are_random_and_stored_as_sha256() -> None:
    one, two = new_key(), new_key()
    assert one != two and one.startswith(KEY_PREFIX) and len(one) > 40
    digest = hash_key(one)
    assert len(digest) == 64 and one not in digest
    ring = KeyRing(
        [
            ApiKey("alice", hash_key(one)),
            ApiKey("bob", hash_key(two), models=frozenset({"m"})),
        ]
    )
    assert ring.find(one).name == "alice"  # type: ignore[union-attr]
    found = ring.find(two)
    assert found is not None and found.name == "bob" and found.models == {"m"}
    assert ring.find("hx-nope") is None and ring.find(None) is None and ring.find("") is None
    assert ring.find(digest) is None  # the stored hash is not a key
    assert ring.find(("hx-other", two)).name == "bob"  # type: ignore[union-attr]
    assert len(KeyRing()) == 0 and KeyRing().find(one) is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("beast.internal", False),
        ("", False),
    ],
)
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_token_check() -> None:
    assert check_token(h(), None) is None  # no token configured: nothing to check
    assert check_token(h(authorization="Bearer t"), "t") is None
    assert check_token(h(x_api_key="t"), "t") is None
    missing = check_token(h(), "t")
    assert missing is not None and missing.status == 401 and missing.code == "missing_credentials"
    wrong = check_token(h(authorization="Bearer u"), "t")
    assert wrong is not None and wrong.status == 401 and wrong.code == "invalid_token"
    error = wrong.error()
    assert error.type == "authentication_error" and error.headers == {"WWW-Authenticate": "Bearer"}


def test_token_guard_leaves_open_paths_and_answers_401_in_the_openai_envelope() -> None:
    reached: list[str] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = TokenGuard(app, "t")

    def call(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        sent: list[dict] = []

        async def send(message):  # type: ignore[no-untyped-def]
            sent.append(message)

        async def receive():  # type: ignore[no-untyped-def]
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": path, "headers": headers, "method": "GET"}
        asyncio.run(guard(scope, receive, send))
        return sent[0]["status"], sent[1]["body"]

    assert call("/health", []) == (200, b"ok")
    assert call("/models", h(authorization="Bearer t")) == (200, b"ok")
    status, body = call("/models", [])
    assert status == 401
    assert orjson.loads(body)["error"]["type"] == "authentication_error"
    assert call("/v1/chat/completions", h(authorization="Bearer x"))[0] == 401
    assert reached == ["/health", "/models"]
