"""Single flight: concurrent calls for the same key share one run of the work.

Six pulls of one image at once must not download it six times, nor race each other for the same
containerd ingest. The first caller for a key starts the work as a task; callers arriving while it
runs wait for that task. Every caller gets the same result, or the same exception. The work runs in
its own task, so one caller being cancelled (a client that went away) does not cancel it for the
others; when the last caller is gone, nobody wants the result and the work is cancelled.

Each flight can carry a state object made when it starts (a pull's progress), which every caller
sees: `joined` is called with it before the caller waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
S = TypeVar("S")
V = TypeVar("V")


@dataclass
class _Flight(Generic[S, V]):
    task: asyncio.Task[V]
    state: S
    waiters: int = 0


class SingleFlight(Generic[K, S, V]):
    def __init__(self, name: str, new_state: Callable[[K], S]) -> None:
        """`name` prefixes the work tasks' names; `new_state(key)` makes each flight's state."""
        self._name = name
        self._new_state = new_state
        self._flights: dict[K, _Flight[S, V]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def in_flight(self) -> list[K]:
        """The keys whose work is in progress."""
        return list(self._flights)

    async def run(
        self, key: K, work: Callable[[S], Awaitable[V]], joined: Callable[[S], None] | None = None
    ) -> V:
        """`work(state)`'s result, from the flight in progress for `key` or from a new one.

        `work` is called only when this call starts the flight, so a caller can tell whether the
        work was its own.
        """
        flight = self._flights.get(key)
        if flight is None:
            state = self._new_state(key)
            task = asyncio.create_task(self._fly(key, work, state), name=f"{self._name} {key}")
            flight = self._flights[key] = _Flight(task, state)
        if joined is not None:
            joined(flight.state)
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.task.done():
                await self._abandon(key, flight)

    async def _fly(self, key: K, work: Callable[[S], Awaitable[V]], state: S) -> V:
        try:
            return await work(state)
        finally:
            # In the task's last step, so no caller can join a flight that has already landed.
            if (flight := self._flights.get(key)) is not None and flight.task is asyncio.current_task():
                del self._flights[key]

    async def _abandon(self, key: K, flight: _Flight[S, V]) -> None:
        """The last caller left: stop the work, and let a new caller start afresh meanwhile."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.task.cancel()
        await asyncio.wait({flight.task})
        if not flight.task.cancelled():
            with contextlib.suppress(BaseException):
                flight.task.result()  # retrieved, so asyncio does not log it as never retrieved
