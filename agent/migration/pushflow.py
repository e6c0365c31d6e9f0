"""Flow control of post-copy's background push (agent/migration/pagepush.py).

The source pushes at most PUSH_WINDOW batches ahead of what the target has stored, and the target
holds back its credits while the workload faults: the push's CPU time would stretch every fault's
round trip.
"""

from __future__ import annotations

import asyncio

PUSH_WINDOW = 2
"""Pushed batches (1 MiB each) the target has not stored yet (pagepush)."""
PUSH_HOLD = 0.05
"""Seconds after the workload's last fault before the target lets the push go on (TargetRelay)."""


class PushWindow:
    """Source: the pushed batches the target has not acknowledged (stored) yet, at most PUSH_WINDOW.
    The target grants the first credits itself, once the restored workload has stopped faulting:
    the push must not compete with the faults of its first moments."""

    def __init__(self) -> None:
        self._credits = asyncio.Semaphore(0)
        self.unacked = 0
        self._drained = asyncio.Event()
        self._drained.set()

    async def take(self) -> None:
        await self._credits.acquire()

    def give_back(self) -> None:
        """A credit taken, then nothing sent."""
        self._credits.release()

    def sent(self) -> None:
        self.unacked += 1
        self._drained.clear()

    def acked(self) -> None:
        self.unacked = max(self.unacked - 1, 0)
        self._credits.release()
        if not self.unacked:
            self._drained.set()

    async def drained(self) -> None:
        await self._drained.wait()
