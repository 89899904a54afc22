"""What a request's handler tells the access log (``cortex.access``): filled in as the
request is served, read when it ends. Its own module, so that the access layer, the
guard (``cortex.auth``) and the relay share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.types import Scope

SCOPE_KEY = "helexa.record"


@dataclass
class RequestRecord:
    model: str | None = None  # as the client named it
    model_id: str | None = None  # what it resolved to
    node: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None  # error code, when the answer is (or became) an error
    request_id: str | None = None  # what the neuron knows the request by (cortex.abandon)
    status: int = 0
    key: str | None = None  # the name of the API key (never the key) that was sent
    models: frozenset[str] | None = None  # that key's model allowlist; None: every model
    omitted_tools: tuple[str, ...] = ()  # tools left out of what the model saw (tool_set)
    ttft_s: float | None = None  # time to the first token, as the relay saw it
    tokens_per_s: float | None = None  # completion tokens / (first token -> end)


def record_of(scope: Scope) -> RequestRecord:
    record = scope.get(SCOPE_KEY)
    if record is None:  # a handler called without the wrapper (unit tests)
        record = scope[SCOPE_KEY] = RequestRecord()
    return record
