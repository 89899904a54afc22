"""Loans cortex arranges for pooled models (docs/pooling.md): one GGUF model run by a
borrower neuron over its own device and devices other neurons lend it (ggml RPC servers).

The plan is ``core.placement.plan_pool`` (pure). Here are its effects: ask each donor for
its loan (``POST /rpc/lend``, naming the borrower, the only host its RPC server will admit)
before the borrower loads, give them back (``POST /rpc/release``) when the load fails or
the model is unloaded, and keep the record of who lends what to whom for ``/v1/models`` and
``cortex status``. A donor also ends a loan by itself once its borrower has been gone a
while, so a release cortex could not deliver (a donor down, cortex restarted) costs
nothing but that wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from helexa.core.catalogue import ModelProfile
from helexa.core.errors import ApiError, unavailable
from helexa.core.placement import CPU_POOL, PoolPlan, Share
from helexa.core.wire import Loan
from helexa.cortex.fleet import NeuronState

log = logging.getLogger("helexa.cortex.pooling")

LEND_TIMEOUT_S = 60.0
# (neuron, path, body, timeout) -> (status, payload): the router's own call to a neuron
Post = Callable[[NeuronState, str, dict[str, object], float], Awaitable[tuple[int, dict]]]


@dataclass(frozen=True)
class Lent:
    """One donor's loan to a pooled model."""

    donor: str
    pool: int
    mb: int
    loan_id: str
    endpoint: str

    def as_json(self) -> dict[str, object]:
        return {
            "node": self.donor,
            "device": "cpu" if self.pool == CPU_POOL else f"cuda:{self.pool}",
            "mb": self.mb,
            "endpoint": self.endpoint,
        }


@dataclass(frozen=True)
class Pooled:
    borrower: str
    local: Share
    loans: tuple[Lent, ...]

    def as_json(self) -> dict[str, object]:
        return {
            "borrower": self.borrower,
            "local_mb": self.local.mb,
            "donors": [loan.as_json() for loan in self.loans],
        }


def lend_failed(share: Share, reason: str) -> ApiError:
    return unavailable(
        f"{share.neuron} could not lend {share.mb} MB for a pooled load: {reason}",
        code="lend_failed",
        retry_after=5,
    )


def host_of(state: NeuronState) -> str:
    """The borrower's address as its donors must admit it: the host cortex reaches it at."""
    return urlsplit(state.endpoint).hostname or state.endpoint


class Pools:
    def __init__(self, neurons: dict[str, NeuronState], post: Post) -> None:
        self._neurons = neurons
        self._post = post
        self.models: dict[str, Pooled] = {}

    async def lend(self, profile: ModelProfile, plan: PoolPlan) -> tuple[Lent, ...]:
        """Every donor's loan, asked at once; all given back if any is refused."""
        borrower = self._neurons[plan.borrower.neuron]
        asked = [self._lend_one(profile, share, host_of(borrower)) for share in plan.donors]
        outcomes = await asyncio.gather(*asked, return_exceptions=True)
        loans = tuple(o for o in outcomes if isinstance(o, Lent))
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            await self.release(loans)
            raise failure
        return loans

    async def _lend_one(self, profile: ModelProfile, share: Share, borrower: str) -> Lent:
        state = self._neurons[share.neuron]
        body: dict[str, object] = {
            "device": None if share.pool == CPU_POOL else share.pool,
            "mb": share.mb,
            "borrower": borrower,
            "model_id": profile.id,
        }
        try:
            status, payload = await self._post(state, "/rpc/lend", body, LEND_TIMEOUT_S)
        except Exception as exc:
            raise lend_failed(share, str(exc)) from exc
        if status != 200:
            raise lend_failed(share, (payload.get("error") or {}).get("message", str(status)))
        loan = Loan.model_validate(payload)
        return Lent(share.neuron, share.pool, share.mb, loan.id, loan.endpoint)

    async def release(self, loans: tuple[Lent, ...]) -> None:
        """Give loans back (best effort: a donor that cannot be told ends it by itself)."""
        await asyncio.gather(*(self._release_one(loan) for loan in loans))

    async def _release_one(self, loan: Lent) -> None:
        state = self._neurons.get(loan.donor)
        if state is None:
            return
        try:
            await self._post(state, "/rpc/release", {"loan_id": loan.loan_id}, LEND_TIMEOUT_S)
        except Exception as exc:
            log.info("loan not released", extra={"node": loan.donor, "error": str(exc)})

    def record(self, model_id: str, plan: PoolPlan, loans: tuple[Lent, ...]) -> None:
        self.models[model_id] = Pooled(plan.borrower.neuron, plan.borrower, loans)

    async def forget(self, model_id: str, borrower: str | None = None) -> None:
        """The model is gone from its borrower: its loans go back."""
        pooled = self.models.get(model_id)
        if pooled is None or (borrower is not None and pooled.borrower != borrower):
            return
        del self.models[model_id]
        await self.release(pooled.loans)
        log.info(
            "pool released",
            extra={
                "model": model_id,
                "node": pooled.borrower,
                "donors": ",".join(loan.donor for loan in pooled.loans),
            },
        )

    async def sweep(self) -> None:
        """Forget pools whose borrower no longer has the model (a donor was lost, so the
        borrower dropped it; or it was unloaded behind cortex's back)."""
        gone = [
            model_id
            for model_id, pooled in self.models.items()
            if model_id not in self._neurons[pooled.borrower].models
        ]
        for model_id in gone:
            await self.forget(model_id)

    def split_of(self, model_id: str, node: str) -> dict[str, object] | None:
        """How a model loaded on ``node`` is pooled (None: it is not): as cortex arranged
        it, else (cortex restarted since) as the borrower and its donors report it."""
        pooled = self.models.get(model_id)
        if pooled is not None and pooled.borrower == node:
            return pooled.as_json()
        status = self._neurons[node].models.get(model_id)
        if status is None or not status.rpc:
            return None
        loans = {
            loan.endpoint: (state.name, loan)
            for state in self._neurons.values()
            if state.health is not None
            for loan in state.health.loans
        }
        donors = []
        for remote in status.rpc:
            donor, loan = loans.get(remote.endpoint, (None, None))
            device = loan.device if loan is not None else None
            donors.append(
                {"node": donor, "device": device, "mb": remote.mb, "endpoint": remote.endpoint}
            )
        return {"borrower": node, "local_mb": status.local_mb, "donors": donors}
