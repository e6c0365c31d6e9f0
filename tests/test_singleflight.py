"""core.singleflight: one run of the work per key at a time, the same outcome for every caller."""

from __future__ import annotations

import asyncio

import pytest

from core.singleflight import SingleFlight


class Work:
    """Work that counts its runs and finishes (or fails) when the test says so."""

    def __init__(self) -> None:
        self.runs = 0
        self.release = asyncio.Event()
        self.cancelled = False
        self.error: Exception | None = None

    async def __call__(self, state: list[str]) -> str:
        self.runs += 1
        state.append("started")
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.error is not None:
            raise self.error
        return f"result {self.runs}"


def flights() -> SingleFlight[str, list[str], str]:
    return SingleFlight("test", lambda key: [key])


async def test_concurrent_callers_share_one_run_and_its_state() -> None:
    flight, work = flights(), Work()
    seen: list[list[str]] = []
    callers = [asyncio.create_task(flight.run("k", work, joined=seen.append)) for _ in range(5)]
    await asyncio.sleep(0.01)
    work.release.set()
    assert await asyncio.gather(*callers) == ["result 1"] * 5
    assert work.runs == 1 and len(flight) == 0
    assert all(state is seen[0] for state in seen) and seen[0] == ["k", "started"]
    # A landed flight is gone: the next call runs the work again.
    assert await flight.run("k", work) == "result 2"


async def test_every_caller_gets_the_same_error() -> None:
    flight, work = flights(), Work()
    work.error = ValueError("registry said no")
    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(3)]
    await asyncio.sleep(0.01)
    work.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(r is work.error for r in results)
    assert work.runs == 1


async def test_different_keys_do_not_share() -> None:
    flight, work = flights(), Work()
    work.release.set()
    assert await asyncio.gather(flight.run("a", work), flight.run("b", work)) == ["result 1", "result 2"]


async def test_one_caller_leaving_does_not_cancel_the_work_the_last_one_does() -> None:
    flight, work = flights(), Work()
    first = asyncio.create_task(flight.run("k", work))
    second = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not work.cancelled
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert work.cancelled and len(flight) == 0  # stopped, awaited and forgotten
