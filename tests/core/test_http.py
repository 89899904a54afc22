"""Cancelling work when the client leaves, without losing anyone else's cancellation."""

from __future__ import annotations

import asyncio

import pytest

from helexa.core.http import ClientGone, unless_disconnected


def receiver(gone: asyncio.Event):  # type: ignore[no-untyped-def]
    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


async def run(order: str) -> str:
    gone = asyncio.Event()
    stopped = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(10)
        finally:
            stopped.set()  # the work saw its cancellation
        return "finished"

    async def handler() -> str:
        try:
            return await unless_disconnected(work(), receiver(gone))
        except ClientGone:
            await asyncio.sleep(0.01)  # no stale cancellation may hit a later await
            return "client gone"

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.01)
    if order == "disconnect":
        gone.set()
    elif order == "disconnect, then shutdown":
        gone.set()
        await asyncio.sleep(0)
        task.cancel()
    try:
        result = await task
    except asyncio.CancelledError:
        result = "cancelled"
    assert stopped.is_set()
    return result


@pytest.mark.parametrize(
    ("order", "outcome"),
    [
        ("disconnect", "client gone"),
        ("disconnect, then shutdown", "cancelled"),  # the other canceller is not swallowed
    ],
)
def test_unless_disconnected(order: str, outcome: str) -> None:
    assert asyncio.run(run(order)) == outcome


def test_work_that_finishes_first_is_returned() -> None:
    async def scenario() -> str:
        return await unless_disconnected(asyncio.sleep(0, "done"), receiver(asyncio.Event()))

    assert asyncio.run(scenario()) == "done"
