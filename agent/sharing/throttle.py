"""The upload rate limit as a token bucket: a pure state (`Bucket.take`) and the async driver
(`RateLimit`) that sleeps as it says. One per server, shared by every peer it serves."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    """`rate` bytes per second, bursts up to `burst` bytes; `tokens` available at time `at`."""

    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, n: int, now: float) -> tuple[Bucket, float]:
        """Spend `n` bytes at `now`: the new state, and the seconds to wait before sending them (the
        debt is paid by waiting, so a chunk larger than the burst still goes, later)."""
        tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - n
        wait = 0.0 if tokens >= 0 else -tokens / self.rate
        return Bucket(self.rate, self.burst, tokens, now), wait


class RateLimit:
    """Paces bytes to `rate` per second (0: no limit) across every caller."""

    def __init__(self, rate: int) -> None:
        self._bucket = Bucket(rate, max(rate / 10, 1 << 20), 0.0, 0.0) if rate > 0 else None

    async def spend(self, n: int) -> None:
        if self._bucket is None:
            return
        loop = asyncio.get_running_loop()
        self._bucket, wait = self._bucket.take(n, loop.time())
        if wait > 0:
            await asyncio.sleep(wait)
