"""What a web browser may ask of either daemon: neither listens for browsers, so a web page
must not be able to drive a fleet that has no keys (a local one, ``cortex up``).

- ``Host`` must be one of this daemon's names, or DNS rebinding (a page whose own name is
  pointed at 127.0.0.1) would make the page same-origin with the daemon: loopback names,
  any IP literal (rebinding needs a name the attacker resolves), the listen address, this
  machine's own names when listening beyond loopback, and ``[http] allowed_hosts``.
- A request carrying an ``Origin`` that is neither the daemon's own nor in ``[http]
  allowed_origins`` is refused unless it is a GET or HEAD (whose answer such a page cannot
  read). CORS is off unless origins are configured; for those, preflights are answered and
  answers carry ``Access-Control-Allow-Origin``.
- curl, the SDKs and Claude Code send no ``Origin`` and a loopback or configured ``Host``:
  unaffected. (JSON bodies must say so: ``core.http.require_json``.)

The decisions are pure functions; ``BrowserGuard.screen`` applies them to a request and
``BrowserMiddleware`` (or cortex's access layer) answers what it refuses.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from helexa.core.auth import Headers, send_error
from helexa.core.errors import ApiError
from helexa.core.http import error_body

log = logging.getLogger("helexa.browser")

ANY = "*"
WILDCARD_LISTEN = frozenset({"", "0.0.0.0", "::"})
SAFE_METHODS = frozenset({"GET", "HEAD"})  # a page cannot read their answers without CORS
DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpSettings(BaseModel):
    """``[http]`` of cortex.toml and neuron.toml: names and web origins beyond the defaults."""

    # Host names this daemon is reached by, besides loopback, IP literals, the listen address
    # and (listening beyond loopback) this machine's hostname and FQDN; "*": any name.
    allowed_hosts: list[str] = Field(default_factory=list)
    # Web origins ("https://app.example:8443") whose pages may call the API: CORS for them.
    # "*": any page (only sensible with API keys, which a page then has to hold).
    allowed_origins: list[str] = Field(default_factory=list)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        out = []
        for entry in value:
            name = entry.strip().lower().rstrip(".")
            if is_ip(name.strip("[]")):
                name = name.strip("[]")
            elif name != ANY and (not name or any(c in name for c in "/:@ ")):
                raise ValueError(f"expected a host name or IP address (no port), got {entry!r}")
            out.append(name)
        return out

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        out = []
        for entry in value:
            origin = ANY if entry.strip() == ANY else normalize_origin(entry)
            if origin is None:
                raise ValueError(f"expected an origin such as https://app.example, got {entry!r}")
            out.append(origin)
        return out


# --- decisions ---------------------------------------------------------------------------------


def host_name(header: str) -> str | None:
    """The name in a ``Host`` header (lowercase, no port, no trailing dot); None if malformed."""
    value = header.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        return name
    if value.count(":") > 1:  # an unbracketed IPv6 literal, with or without a port
        for candidate in (value, value.rsplit(":", 1)[0]):
            if is_ip(candidate):
                return candidate
        return None
    name, sep, port = value.partition(":")
    if (sep and not port.isdigit()) or not name:
        return None
    return name.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_names(listen: str, allowed: Iterable[str] = ()) -> frozenset[str]:
    """The DNS names (IP literals are always fine) a daemon listening on ``listen`` answers
    to: localhost, the listen name, the configured ones, and — listening beyond loopback —
    this machine's own names (cortex reaches a neuron by its endpoint URL)."""
    listen = listen.strip().strip("[]").lower()
    names = {"localhost", listen, *allowed}
    if listen in WILDCARD_LISTEN or not (listen == "localhost" or _loopback_ip(listen)):
        names |= {n.lower().rstrip(".") for n in (socket.gethostname(), socket.getfqdn())}
    return frozenset(n for n in names if n)


def _loopback_ip(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(header: str | None, names: frozenset[str]) -> bool:
    """Whether a request with this ``Host`` header is meant for this daemon. No header at
    all (HTTP/1.0 tools) is not a browser's request: allowed."""
    if header is None:
        return True
    name = host_name(header)
    if name is None:
        return False
    return name in names or ANY in names or is_ip(name)


def normalize_origin(value: str) -> str | None:
    """``scheme://host[:port]`` (lowercase, default port left out), or None for anything
    that is not an http(s) origin (``null``, a path, credentials)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in DEFAULT_PORTS or not host or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port and port != DEFAULT_PORTS[scheme] else "")


def same_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` is the daemon itself (a page it served), as named by ``Host``."""
    normal = normalize_origin(origin)
    if normal is None or host is None:
        return False
    return normalize_origin(f"{normal.split(':', 1)[0]}://{host.strip()}") == normal


def origin_allowed(origin: str, allowed: frozenset[str]) -> bool:
    """Whether pages of ``origin`` were allowed by the operator (``[http] allowed_origins``)."""
    normal = normalize_origin(origin)
    return normal is not None and (ANY in allowed or normal in allowed)


# --- applying them -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Screen:
    """What to do with a request: refuse it, answer its preflight, or serve it (adding
    ``cors`` headers to the answer)."""

    error: ApiError | None = None
    preflight: bool = False
    cors: tuple[tuple[bytes, bytes], ...] = ()


PASS = Screen()
PREFLIGHT_METHODS = b"GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE = b"600"
EXPOSED = b"retry-after"  # what a page may read besides the simple headers


def _values(headers: Headers, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in headers if k == name]


def _token_list(value: str) -> bool:
    return all(c.isalnum() or c in "-_, " for c in value)


def host_refused(header: str) -> ApiError:
    return ApiError(
        421,
        f"this server is not {header!r}: a name it does not know is refused (it could be a "
        "web page rebinding its own name); add the name to [http] allowed_hosts",
        code="host_not_allowed",
    )


def origin_refused(origin: str) -> ApiError:
    return ApiError(
        403,
        f"requests from web pages of {origin!r} are refused; to allow them, add the origin "
        "to [http] allowed_origins",
        type="permission_error",
        code="origin_not_allowed",
    )


def ambiguous(name: str) -> ApiError:
    return ApiError(400, f"the request has more than one {name} header", code="ambiguous_header")


class BrowserGuard:
    def __init__(self, listen_host: str, settings: HttpSettings | None = None) -> None:
        settings = settings or HttpSettings()
        self.hosts = host_names(listen_host, settings.allowed_hosts)
        self.origins = frozenset(settings.allowed_origins)
        self._reported: set[str] = set()

    def screen(self, scope: Scope) -> Screen:
        """The decision for one request, from its method and headers and the settings (a
        refused host name is also logged, once)."""
        headers: Headers = scope["headers"]
        hosts = _values(headers, b"host")
        if len(set(hosts)) > 1:
            return Screen(error=ambiguous("Host"))
        host = hosts[0] if hosts else None
        if not host_allowed(host, self.hosts):
            assert host is not None
            self._report(host)
            return Screen(error=host_refused(host))
        origins = _values(headers, b"origin")
        if not origins:
            return PASS
        if len(set(origins)) > 1:
            return Screen(error=ambiguous("Origin"))
        origin = origins[0]
        if same_origin(origin, host):
            return PASS
        method = scope["method"]
        if not origin_allowed(origin, self.origins):
            return PASS if method in SAFE_METHODS else Screen(error=origin_refused(origin))
        cors = ((b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"))
        requested = _values(headers, b"access-control-request-method")
        if method != "OPTIONS" or not requested:
            return Screen(cors=(*cors, (b"access-control-expose-headers", EXPOSED)))
        preflight = [
            *cors,
            (b"access-control-allow-methods", PREFLIGHT_METHODS),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE),
        ]
        wanted = ", ".join(_values(headers, b"access-control-request-headers"))
        if wanted and _token_list(wanted):  # the page is trusted: the headers it asks for
            preflight.append((b"access-control-allow-headers", wanted.encode()))
        return Screen(preflight=True, cors=tuple(preflight))

    def _report(self, host: str) -> None:
        # Once per name (and a bounded set): a neuron reached by an unknown name is
        # refused on every poll, which the access log already shows.
        if host in self._reported or len(self._reported) >= 256:
            return
        self._reported.add(host)
        log.warning(
            "request for an unknown host name refused",
            extra={"host": host, "setting": "[http] allowed_hosts"},
        )


Envelope = Callable[[Scope, ApiError], bytes]


def path_envelope(scope: Scope, error: ApiError) -> bytes:
    return error_body(scope["path"], error)


async def answer(
    screen: Screen, scope: Scope, send: Send, envelope: Envelope = path_envelope
) -> Send | None:
    """Act on ``screen``: None when the request was answered here (refused, or its
    preflight); else the ``send`` to serve it with."""
    if screen.error is not None:
        await send_error(send, screen.error, envelope(scope, screen.error))
        return None
    if screen.preflight:
        await send({"type": "http.response.start", "status": 204, "headers": list(screen.cors)})
        await send({"type": "http.response.body", "body": b""})
        return None
    if not screen.cors:
        return send
    cors = screen.cors

    async def with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *cors]}
        await send(message)

    return with_cors


class BrowserMiddleware:
    """ASGI: ``BrowserGuard`` in front of ``app`` (the neuron's; cortex's access layer
    screens requests itself so that refusals are counted)."""

    def __init__(self, app: ASGIApp, guard: BrowserGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        serve = await answer(self.guard.screen(scope), scope, send)
        if serve is not None:
            await self.app(scope, receive, serve)
