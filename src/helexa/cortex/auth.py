"""Who may call cortex (§2.8.1): API keys on the API, the admin token on /admin/*.

- No keys configured (no ``[auth] keys_file``, no ``[auth] api_key``): the API is open
  (local use; logged once at start). Configured: every route but ``/health`` and ``/``
  needs a key — an empty keys file refuses everything, it never opens the gateway.
- ``/admin/models/*`` (lifecycle) needs ``admin_token``; with API keys but no admin token
  they are refused. ``/admin/fleet`` (read-only: ``cortex status``) takes the admin token
  or an API key without a model allowlist (it names every model and neuron). With neither
  configured, /admin/* is open like the rest.
- A key's model allowlist: a request whose model (as sent, or as resolved) is not in it
  is a 403; ``/v1/models`` lists only what it may use, and ``/v1/models/{name}`` of any
  other is a 404, as for a model that does not exist.
- A request repeating ``Authorization`` or ``x-api-key`` with different values is a 400.

The decision is ``decide`` (pure); ``Guard.admit`` applies it at the access layer, before
any route runs, and answers in the envelope of the protocol the client speaks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Scope, Send

from helexa.core.auth import (
    AmbiguousCredentials,
    Denial,
    Headers,
    KeyRing,
    credentials,
    missing,
    same_secret,
    send_error,
)
from helexa.core.errors import ApiError, anthropic_body
from helexa.cortex.keys import KeyStore
from helexa.cortex.record import RequestRecord

ADMIN_KEY_NAME = ":admin"  # what the access log and metrics call the admin token
OPEN_PATHS = frozenset({"/health", "/", "/ui"})  # /ui: the dashboard's page, no data in it
READ_ONLY_ADMIN = frozenset({"/admin/fleet", "/admin/dashboard", "/admin/models/stored"})
ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})


@dataclass(frozen=True)
class Verdict:
    key: str | None = None  # the name of the key (or token) the request carried
    models: frozenset[str] | None = None  # that key's allowlist; None: every model
    denial: Denial | None = None


ALLOWED = Verdict()


def decide(
    path: str, secret: str | Sequence[str] | None, keys: KeyRing | None, admin_token: str | None
) -> Verdict:
    """May a request for ``path`` carrying ``secret`` (or these secrets: Bearer and
    x-api-key) go on? ``keys`` is None when no API keys are configured (an empty ring is a
    configured, empty keys file)."""
    secret = (secret,) if isinstance(secret, str) else tuple(secret or ())
    if path in OPEN_PATHS:
        return ALLOWED
    if path.startswith("/admin/"):
        return _decide_admin(path, secret, keys, admin_token)
    if keys is None:
        return ALLOWED
    key = keys.find(secret)
    if key is None:
        if not secret:
            return Verdict(denial=missing("an API key"))
        return Verdict(denial=Denial(401, "invalid_api_key", "invalid API key"))
    return Verdict(key=key.name, models=key.models)


def _decide_admin(
    path: str, secret: tuple[str, ...], keys: KeyRing | None, admin_token: str | None
) -> Verdict:
    if admin_token is None and keys is None:
        return ALLOWED
    if admin_token is not None and same_secret(secret, admin_token):
        return Verdict(key=ADMIN_KEY_NAME)
    key = keys.find(secret) if keys is not None else None
    read_only = path in READ_ONLY_ADMIN
    if key is not None and read_only and key.models is None:
        return Verdict(key=key.name)
    if key is not None and read_only:  # the fleet view names every model and neuron
        return Verdict(
            key=key.name,
            denial=Denial(
                403, "admin_only", f"an API key restricted to certain models cannot read {path}"
            ),
        )
    if key is not None:
        unset = "" if admin_token else " (admin_token is not set in cortex.toml: none can)"
        return Verdict(
            key=key.name,
            denial=Denial(403, "admin_only", f"an API key cannot call {path}{unset}"),
        )
    if read_only and keys is not None:
        wanted = "an API key or the admin token" if admin_token else "an API key"
    elif admin_token:
        wanted = "the admin token"
    else:
        wanted = "the admin token (admin_token is not set in cortex.toml: none can)"
    if not secret:
        return Verdict(denial=missing(wanted))
    return Verdict(denial=Denial(401, "invalid_token", f"{wanted} is required; this is not one"))


def anthropic_envelope(path: str, headers: Headers) -> bool:
    """Whether an error on ``path`` is worded in Anthropic's envelope (else OpenAI's)."""
    if path in ANTHROPIC_PATHS:
        return True
    if path == "/v1/models" or path.startswith("/v1/models/"):
        return any(name == b"anthropic-version" for name, _ in headers)
    return False


def error_body(error: ApiError, anthropic_shape: bool) -> bytes:
    if anthropic_shape:
        return orjson.dumps(anthropic_body(error))
    return orjson.dumps(error.openai_body())


def envelope(scope: Scope, error: ApiError) -> bytes:
    """``error`` in the envelope of the protocol the request speaks."""
    return error_body(error, anthropic_envelope(scope["path"], scope["headers"]))


# --- model allowlists ------------------------------------------------------------------------


def model_allowed(models: frozenset[str] | None, *names: str | None) -> bool:
    """A key may use a model when its allowlist names it as sent or as resolved."""
    return models is None or any(name in models for name in names if name)


def not_allowed(model: str) -> ApiError:
    return ApiError(
        403,
        f"this API key may not use model {model!r}",
        type="permission_error",
        code="model_not_allowed",
        param="model",
    )


def require_model(
    models: frozenset[str] | None, requested: str, model_id: str, grants: Iterable[str] = ()
) -> None:
    """The 403 for a model outside the key's allowlist: the model the name resolved to
    must be allowed, or a name in ``grants`` that led to it (the alias sent, or the
    fallback pattern that matched). A listed name a fallback took elsewhere grants nothing."""
    if not may_use(models, model_id, grants):
        raise not_allowed(requested)


def may_use(models: frozenset[str] | None, model_id: str, grants: Iterable[str] = ()) -> bool:
    """Whether a key with the allowlist ``models`` may use ``model_id``, reached through
    the names in ``grants`` (``require_model``)."""
    return models is None or model_id in models or any(g in models for g in grants)


def visible(entries: Iterable[dict[str, Any]], models: frozenset[str] | None) -> list[Any]:
    """The /v1/models entries a key may use (an alias or fallback: by its own name or its
    target's)."""
    return [
        e
        for e in entries
        if model_allowed(models, e["id"], e.get("alias_of"), e.get("fallback_for"))
    ]


# --- at the access layer ---------------------------------------------------------------------


class Guard:
    """Applies ``decide`` to every request before any route runs."""

    def __init__(self, keys: KeyStore, admin_token: str | None) -> None:
        self.keys = keys
        self.admin_token = admin_token or None
        self.off = not keys.enabled and self.admin_token is None

    async def admit(self, scope: Scope, record: RequestRecord, send: Send) -> bool:
        """True when the request may go on (its key noted on ``record``); else the error
        has been sent."""
        if self.off:
            return True
        path = scope["path"]
        try:
            secrets = credentials(scope["headers"])
        except AmbiguousCredentials as exc:
            verdict = ALLOWED if path in OPEN_PATHS else Verdict(denial=exc.denial)
        else:
            verdict = decide(path, secrets, self.keys.ring(), self.admin_token)
        record.key, record.models = verdict.key, verdict.models
        if verdict.denial is None:
            return True
        error = verdict.denial.error()
        record.error = error.code
        await send_error(send, error, envelope(scope, error))
        return False
