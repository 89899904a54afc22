"""API errors and their OpenAI wire envelope.

Every failure a daemon reports travels as an ``ApiError``; the HTTP layer renders
it in the envelope of the protocol the client spoke.
"""

from __future__ import annotations

import re
from typing import Any

# An absolute (or ~) file path of two or more segments. URLs (http://host/…) and JSON
# pointers (#/definitions/…) are not paths of this server's disk, nor are the API's own
# routes (matched whole below, so a model folder under /models/ is still cut).
_SERVER_PATH = re.compile(r"(?<![\w.:/~\\#-])~?/(?:[\w.@+%=,-]+/)+[\w.@+%=,-]*")
_API_ROUTE = re.compile(
    r"/(?:v1/(?:chat/completions|completions|messages(?:/count_tokens)?|responses|models)"
    r"|models/(?:load|unload|size)|admin/(?:fleet|models/(?:load|unload)))"
)


def _cut(match: re.Match[str]) -> str:
    path = match.group()
    if _API_ROUTE.fullmatch(path.rstrip(".,=")):
        return path
    return "…/" + path.rstrip("/").rsplit("/", 1)[-1]


def scrub_paths(message: str) -> str:
    """``message`` with every server file path cut to its last component (``…/name``):
    error bodies never reveal where the weight cache or model_dirs are; logs keep them."""
    if "/" not in message:
        return message
    return _SERVER_PATH.sub(_cut, message)


class ApiError(Exception):
    """An error with an HTTP status and an OpenAI-style type/code/param."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        # Machine-readable extras inside the envelope (e.g. the token counts of a context
        # overflow, which the Anthropic path rewords); clients ignore unknown fields.
        self.details = details or {}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": scrub_paths(self.message),
                "type": self.type,
                "code": self.code,
                "param": self.param,
                **self.details,
            }
        }

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, code=code or "invalid_request", param=param)


def not_found(message: str, *, code: str = "not_found", param: str | None = None) -> ApiError:
    return ApiError(404, message, type="not_found_error", code=code, param=param)


def model_not_found(model: str) -> ApiError:
    return not_found(
        f"model {model!r} is not loaded on this neuron", code="model_not_found", param="model"
    )


def unavailable(message: str, *, code: str, retry_after: int = 1) -> ApiError:
    return ApiError(
        503,
        message,
        type="service_unavailable",
        code=code,
        headers={"Retry-After": str(retry_after)},
    )


def internal(message: str, *, code: str = "internal_error") -> ApiError:
    return ApiError(500, message, type="server_error", code=code)


# --- the Anthropic envelope ---------------------------------------------------------------------

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    421: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "request_too_large",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    return ANTHROPIC_ERROR_TYPES.get(status, "api_error")


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """An error in Anthropic's envelope (cortex's Anthropic routes, and the HTTP layer's
    own errors on them)."""
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


def anthropic_body(exc: ApiError) -> dict[str, Any]:
    return anthropic_error_body(exc.status, scrub_paths(exc.message))
