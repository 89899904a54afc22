"""cortex's calls to a neuron's lifecycle API (docs/neuron.md): one typed method per route.

Two kinds of failure, kept apart because callers answer them differently: an
``UpstreamError`` (the neuron could not be reached, broke off, stalled) and a
``NeuronRefused`` (it answered, with an error status and its own error object).
``NeuronClient`` is the interface the load owner and the pools depend on; tests give them
a scripted one.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import orjson

from helexa.core.wire import DownloadInfo, LendRequest, Loan, ModelSize, ModelStatus, StoredModel
from helexa.cortex.fleet import NeuronState

# A ModelSpec as cortex sends it (/models/load, /models/size, /models/pull): built by
# ``load_rules.spec_for``, validated by the neuron.
LoadSpec = dict[str, object]

SIZE_TIMEOUT_S = 60.0  # /models/size reads file headers: a neuron that takes longer is sick
LEND_TIMEOUT_S = 90.0  # longer than a donor gives its RPC server to start (60 s)
STORED_TIMEOUT_S = 10.0  # a walk of the caches' folders: one neuron must not hold up `ls`


class NeuronRefused(Exception):
    """The neuron answered a lifecycle call with ``status`` and its error object."""

    def __init__(self, status: int, error: dict[str, object]) -> None:
        self.status = status
        self.error = error
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return str(self.error.get("message") or f"status {self.status}")

    @property
    def code(self) -> str | None:
        code = self.error.get("code")
        return code if isinstance(code, str) else None


class LoadReply(NamedTuple):
    outcome: str  # "loaded", or "loading" (the neuron goes on in the background)
    model: ModelStatus | None


class NeuronClient(Protocol):
    async def load(self, neuron: NeuronState, spec: LoadSpec) -> LoadReply: ...

    async def unload(self, neuron: NeuronState, model_id: str) -> None:
        """Done also when the neuron no longer had it (404)."""
        ...

    async def size(self, neuron: NeuronState, spec: LoadSpec) -> ModelSize: ...

    async def recycle(self, neuron: NeuronState) -> list[str]: ...

    async def lend(self, neuron: NeuronState, request: LendRequest) -> Loan: ...

    async def release(self, neuron: NeuronState, loan_id: str) -> None: ...

    async def pull(self, neuron: NeuronState, spec: LoadSpec) -> DownloadInfo: ...

    async def delete(self, neuron: NeuronState, model_id: str) -> int:
        """The bytes freed."""
        ...

    async def stored(self, neuron: NeuronState) -> list[StoredModel]: ...


class HttpNeuronClient:
    """``NeuronClient`` over each neuron's connection pool (its token a default header)."""

    def __init__(self, *, connect_timeout_s: float, load_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.load_timeout_s = load_timeout_s  # loads, unloads, recycles: a model's load time

    async def load(self, neuron: NeuronState, spec: LoadSpec) -> LoadReply:
        payload = await self._call(neuron, "/models/load", spec, self.load_timeout_s)
        model = payload.get("model")
        landed = ModelStatus.model_validate(model) if isinstance(model, dict) else None
        return LoadReply(str(payload.get("status", "")), landed)

    async def unload(self, neuron: NeuronState, model_id: str) -> None:
        body = {"model_id": model_id}
        status, payload = await self._post(neuron, "/models/unload", body, self.load_timeout_s)
        if status not in (200, 404):
            raise NeuronRefused(status, _error_of(payload))

    async def size(self, neuron: NeuronState, spec: LoadSpec) -> ModelSize:
        payload = await self._call(neuron, "/models/size", spec, SIZE_TIMEOUT_S)
        return ModelSize.model_validate(payload)

    async def recycle(self, neuron: NeuronState) -> list[str]:
        payload = await self._call(neuron, "/workers/recycle", {}, self.load_timeout_s)
        recycled = payload.get("recycled")
        return [str(device) for device in recycled] if isinstance(recycled, list) else []

    async def lend(self, neuron: NeuronState, request: LendRequest) -> Loan:
        body = request.model_dump(mode="json")
        return Loan.model_validate(await self._call(neuron, "/rpc/lend", body, LEND_TIMEOUT_S))

    async def release(self, neuron: NeuronState, loan_id: str) -> None:
        await self._call(neuron, "/rpc/release", {"loan_id": loan_id}, LEND_TIMEOUT_S)

    async def pull(self, neuron: NeuronState, spec: LoadSpec) -> DownloadInfo:
        payload = await self._call(neuron, "/models/pull", spec, SIZE_TIMEOUT_S)
        return DownloadInfo.model_validate(payload)

    async def delete(self, neuron: NeuronState, model_id: str) -> int:
        body = {"model_id": model_id}
        payload = await self._call(neuron, "/models/delete", body, SIZE_TIMEOUT_S)
        freed = payload.get("freed_bytes")
        return freed if isinstance(freed, int) else 0

    async def stored(self, neuron: NeuronState) -> list[StoredModel]:
        status, payload = await self._request(
            neuron, "GET", "/models/stored", None, STORED_TIMEOUT_S
        )
        if status != 200 or not isinstance(payload, list):
            error = payload if isinstance(payload, dict) else {}
            raise NeuronRefused(status if status != 200 else 502, _error_of(error))
        return [StoredModel.model_validate(entry) for entry in payload]

    async def _call(
        self, neuron: NeuronState, path: str, body: dict[str, object], timeout: float
    ) -> dict[str, object]:
        status, payload = await self._post(neuron, path, body, timeout)
        if status != 200:
            raise NeuronRefused(status, _error_of(payload))
        return payload

    async def _post(
        self, neuron: NeuronState, path: str, body: dict[str, object], timeout: float
    ) -> tuple[int, dict[str, object]]:
        status, payload = await self._request(neuron, "POST", path, body, timeout)
        if not isinstance(payload, dict):  # every lifecycle answer is an object
            payload = {"error": {"message": f"unexpected answer: {str(payload)[:300]}"}}
        return status, payload

    async def _request(
        self,
        neuron: NeuronState,
        method: str,
        path: str,
        body: dict[str, object] | None,
        timeout: float,
    ) -> tuple[int, object]:
        response = await neuron.pool.request(
            method,
            path,
            None if body is None else orjson.dumps(body),
            connect_timeout=self.connect_timeout_s,
            header_timeout=timeout,
        )
        try:
            raw = await response.read(timeout)
        finally:
            response.close()
        try:
            return response.status, orjson.loads(raw)
        except orjson.JSONDecodeError:  # a proxy's error page, a stray body
            return response.status, {"error": {"message": raw.decode(errors="replace")[:300]}}


def _error_of(payload: dict[str, object]) -> dict[str, object]:
    error = payload.get("error")
    return error if isinstance(error, dict) else {}
