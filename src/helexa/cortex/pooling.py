"""Loans cortex arranges for pooled models (docs/pooling.md): one GGUF model run by a
borrower neuron over its own device and devices other neurons lend it (ggml RPC servers).

The plan is ``placement.plan_pool`` (pure). Here are its effects: ask each donor for
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
from dataclasses import dataclass
from urllib.parse import urlsplit

from helexa.core.errors import ApiError, unavailable
from helexa.core.wire import LendRequest
from helexa.cortex.catalogue import ModelProfile
from helexa.cortex.fleet import NeuronState
from helexa.cortex.neuron_client import NeuronClient, NeuronRefused
from helexa.cortex.placement import CPU_POOL, PoolPlan, Share

log = logging.getLogger("helexa.cortex.pooling")


@dataclass(frozen=True)
class LoanRecord:
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
    loans: tuple[LoanRecord, ...]

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
    def __init__(self, neurons: dict[str, NeuronState], client: NeuronClient) -> None:
        self._neurons = neurons
        self._client = client
        self.models: dict[tuple[str, str], Pooled] = {}  # (model, borrower) -> its pool
        self._releases: set[asyncio.Task[None]] = set()

    async def lend(self, profile: ModelProfile, plan: PoolPlan) -> tuple[LoanRecord, ...]:
        """Every donor's loan, asked at once; all given back if any is refused."""
        borrower = self._neurons[plan.borrower.neuron]
        asked = [self._lend_one(profile, share, host_of(borrower)) for share in plan.donors]
        outcomes = await asyncio.gather(*asked, return_exceptions=True)
        loans = tuple(o for o in outcomes if isinstance(o, LoanRecord))
        failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if failure is not None:
            await self.release(loans)
            raise failure
        return loans

    async def _lend_one(self, profile: ModelProfile, share: Share, borrower: str) -> LoanRecord:
        try:
            request = LendRequest(
                device=None if share.pool == CPU_POOL else share.pool,
                mb=share.mb,
                borrower=borrower,
                model_id=profile.id,
            )
            loan = await self._client.lend(self._neurons[share.neuron], request)
        except NeuronRefused as exc:
            raise lend_failed(share, exc.message) from exc
        except Exception as exc:
            raise lend_failed(share, str(exc)) from exc
        return LoanRecord(share.neuron, share.pool, share.mb, loan.id, loan.endpoint)

    async def release(self, loans: tuple[LoanRecord, ...]) -> None:
        """Give loans back (best effort: a donor that cannot be told ends it by itself)."""
        await asyncio.gather(*(self._release_one(loan) for loan in loans))

    async def _release_one(self, loan: LoanRecord) -> None:
        state = self._neurons.get(loan.donor)
        if state is None:
            return
        try:
            await self._client.release(state, loan.loan_id)
        except Exception as exc:
            log.info("loan not released", extra={"node": loan.donor, "error": str(exc)})

    def record(self, model_id: str, plan: PoolPlan, loans: tuple[LoanRecord, ...]) -> None:
        key = (model_id, plan.borrower.neuron)
        self.models[key] = Pooled(plan.borrower.neuron, plan.borrower, loans)

    def forget(self, model_id: str, borrower: str) -> None:
        """The model is gone from its borrower: its loans go back (in the background: a
        donor that does not answer must not hold up an unload or a load)."""
        pooled = self.models.pop((model_id, borrower), None)
        if pooled is None:
            return
        task = asyncio.ensure_future(self.release(pooled.loans))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        log.info(
            "pool released",
            extra={
                "model": model_id,
                "node": borrower,
                "donors": ",".join(loan.donor for loan in pooled.loans),
            },
        )

    def sweep(self) -> None:
        """Forget pools whose borrower, healthy and polled, no longer has the model (a
        donor was lost, so the borrower dropped it; or it was unloaded behind cortex's
        back). A borrower that missed its polls is left alone: its model may be serving."""
        for model_id, borrower in list(self.models):
            state = self._neurons[borrower]
            if state.healthy and state.responsive and model_id not in state.models:
                self.forget(model_id, borrower)

    def split_of(self, model_id: str, node: str) -> dict[str, object] | None:
        """How a model loaded on ``node`` is pooled (None: it is not): as cortex arranged
        it, else (cortex restarted since) as the borrower and its donors report it."""
        pooled = self.models.get((model_id, node))
        if pooled is not None:
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
