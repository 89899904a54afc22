"""The one auth check of both daemons: which secret a request carries, compared in
constant time against a shared token (neuron, cortex's admin routes) or against the hashes
of cortex's API keys.

A request's secret travels as ``Authorization: Bearer <secret>`` (the OpenAI SDK, curl) or
``x-api-key: <secret>`` (the Anthropic SDK, Claude Code). Everything here but ``TokenGuard``
is a pure function of headers and settings, tested without I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from helexa.core.errors import ApiError

KEY_PREFIX = "hx-"
Headers = Iterable[tuple[bytes, bytes]]


class AmbiguousCredentials(ValueError):
    """A request repeating ``Authorization`` or ``x-api-key`` with different values: which
    one a proxy or a daemon honours is not for the client to pick, so it is refused."""

    def __init__(self, header: str) -> None:
        super().__init__(header)
        self.denial = Denial(
            400,
            "ambiguous_credentials",
            f"the request carries more than one {header} header; send one",
        )


def credentials(headers: Headers) -> tuple[str, ...]:
    """The secrets a request carries: its Bearer token, then its ``x-api-key`` (a client
    may send both — Claude Code signed in elsewhere sends a Bearer of its own). One header
    repeated with different values raises ``AmbiguousCredentials``."""
    authorization: set[bytes] = set()
    api_keys: set[bytes] = set()
    for name, value in headers:
        if name == b"authorization":
            authorization.add(value.strip())
        elif name == b"x-api-key":
            api_keys.add(value.strip())
    if len(authorization) > 1:
        raise AmbiguousCredentials("Authorization")
    if len(api_keys) > 1:
        raise AmbiguousCredentials("x-api-key")
    bearer_token = api_key = None
    for value in authorization:
        scheme, _, token = value.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            bearer_token = token.strip()
    for value in api_keys:
        api_key = value.decode("latin-1") or None
    return tuple(s for s in (bearer_token, api_key) if s is not None)


def credential(headers: Headers) -> str | None:
    """The first secret a request carries (Bearer, else ``x-api-key``); None if none."""
    found = credentials(headers)
    return found[0] if found else None


def bearer(token: str | None) -> list[tuple[bytes, bytes]]:
    """The request header that carries ``token`` (none for None)."""
    return [(b"authorization", b"Bearer " + token.encode())] if token else []


def same_secret(supplied: str | Iterable[str] | None, expected: str) -> bool:
    """Constant-time equality (of digests: nothing leaks about length or content); of
    several secrets offered, whether any is ``expected``."""
    offered = (supplied,) if isinstance(supplied, str) else tuple(supplied or ())
    want = hashlib.sha256(expected.encode()).digest()
    return any(hmac.compare_digest(hashlib.sha256(s.encode()).digest(), want) for s in offered)


def hash_key(key: str) -> str:
    """What is stored of an API key: its SHA-256, hex. Keys are random and long (``new_key``),
    so a fast hash suffices — there is nothing to brute-force."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def clean_secret(value: str | None) -> str | None:
    """A configured token or key as requests will be compared with it: without surrounding
    whitespace (a header's value loses it too); empty is unset (None). Whitespace alone is
    a ValueError: it would pass for a secret while guarding nothing."""
    if value is None or value == "":
        return None
    stripped = value.strip()
    if not stripped:
        raise ValueError(
            "is only whitespace: set a real secret "
            "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))') or leave it unset"
        )
    return stripped


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the port on this machine."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


# --- API keys --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    created: str = ""
    models: frozenset[str] | None = None  # the names it may ask for; None: every model


class KeyRing:
    """The API keys a gateway accepts."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys = tuple(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, secret: str | Iterable[str] | None) -> ApiKey | None:
        """The key whose hash matches (of several secrets offered: the first that does);
        every stored hash is compared (no early exit)."""
        offered = (secret,) if isinstance(secret, str) else tuple(secret or ())
        for candidate in offered:
            if not candidate:
                continue
            digest = hash_key(candidate).encode()
            found = None
            for key in self.keys:
                if hmac.compare_digest(digest, key.sha256.encode()):
                    found = key
            if found is not None:
                return found
        return None


# --- denials ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Denial:
    status: int  # 401 (no or a wrong secret), 403 (a right secret, not for this), 400
    code: str
    message: str

    def error(self) -> ApiError:
        kind = {401: "authentication_error", 403: "permission_error"}.get(
            self.status, "invalid_request_error"
        )
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return ApiError(self.status, self.message, type=kind, code=self.code, headers=headers)


def missing(what: str) -> Denial:
    return Denial(
        401,
        "missing_credentials",
        f"{what} is required: send it as 'Authorization: Bearer <token>' or 'x-api-key'",
    )


def check_token(headers: Headers, token: str | None, what: str = "a token") -> Denial | None:
    """None when ``token`` is unset or the request carries it; else why not."""
    if token is None:
        return None
    try:
        supplied = credentials(headers)
    except AmbiguousCredentials as exc:
        return exc.denial
    if not supplied:
        return missing(what)
    if not same_secret(supplied, token):
        return Denial(401, "invalid_token", f"{what} is required; the one sent is not valid")
    return None


async def send_error(send: Send, error: ApiError, body: bytes | None = None) -> None:
    """An error response (``body``: the OpenAI envelope unless given)."""
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body or orjson.dumps(error.openai_body())})


class TokenGuard:
    """ASGI: every HTTP request but ``open_paths`` must carry ``token`` (the neuron's)."""

    def __init__(
        self, app: ASGIApp, token: str, open_paths: frozenset[str] = frozenset({"/health"})
    ) -> None:
        self.app = app
        self.token = token
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            denial = check_token(scope["headers"], self.token, "the neuron token")
            if denial is not None:
                await send_error(send, denial.error())
                return
        await self.app(scope, receive, send)
