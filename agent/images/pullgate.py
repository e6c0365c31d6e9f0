"""Warms yield to pulls: a warm's download waits while a pull is fetching layers on this host.

A warm (a layer fetched ahead of use, `POST /v1/prefetch/layers/{digest}`) shares the host's links
(the registry's, the peers') and its CPU with the pulls of containers about to start, and prefetching
must never starve those. So a warm reads each chunk of its layer only when no pull is fetching
layers here, or when a pull waits for that very layer (the pull joined the warm's download, and a
paused warm would hold it up). A paused warm stops reading its stream, and TCP's flow control stops
its sender: the link is the pull's. `may_read` decides; `PullGate` keeps the counts and wakes the
warms; `YieldsToPulls` is the warm's blob source behind the gate.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import contextmanager

from agent.images.sources import BlobSource, ServedFrom, TransferStarts
from agent.oci import Descriptor


def may_read(pulls: int, wanted: Mapping[str, int], digest: str) -> bool:
    """May a warm of `digest` read its next chunk, with `pulls` pulls fetching and `wanted` (digest ->
    pulls that need it) their layers?"""
    return pulls == 0 or wanted.get(digest, 0) > 0


class PullGate:
    """The pulls fetching layers on this host now, and the warms waiting for them to end."""

    def __init__(self) -> None:
        self._pulls = 0
        self._wanted: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Event()

    @property
    def pulls(self) -> int:
        return self._pulls

    @contextmanager
    def pulling(self, digests: Iterable[str]) -> Iterator[None]:
        """One pull fetching `digests` (its layers) for the duration of the block."""
        digests = list(digests)
        self._pulls += 1
        self._wanted.update(digests)
        self._wake()  # a paused warm of one of these layers goes on: the pull waits for it
        try:
            yield
        finally:
            self._pulls -= 1
            self._wanted.subtract(digests)
            self._wanted = +self._wanted  # drop the zeros
            self._wake()

    async def clear(self, digest: str) -> None:
        """Return once a warm of `digest` may read (at once when no pull is fetching)."""
        while not may_read(self._pulls, self._wanted, digest):
            await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class YieldsToPulls:
    """`source` for a warm: each chunk read only when the gate allows (see the module docstring)."""

    def __init__(self, source: BlobSource, gate: PullGate) -> None:
        self.inner = source
        """The source behind the gate (a retry may need to know it is the peers')."""
        self._gate = gate

    @property
    def labels(self) -> Mapping[str, str]:
        return self.inner.labels

    async def fetch_blob(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        await self._gate.clear(desc.digest)
        async for chunk in self.inner.fetch_blob(desc, offset):
            yield chunk
            await self._gate.clear(desc.digest)

    async def fetch_bytes(self, desc: Descriptor) -> bytes:
        await self._gate.clear(desc.digest)
        return await self.inner.fetch_bytes(desc)

    def served_from(self, digest: str) -> str | None:
        return self.inner.served_from(digest) if isinstance(self.inner, ServedFrom) else None

    def transfer_started(self, digest: str) -> float | None:
        return self.inner.transfer_started(digest) if isinstance(self.inner, TransferStarts) else None
