"""Warms yield to pulls (agent/images/pullgate.py): the rule, the gate and the warm's source, no I/O."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from agent.images.pullgate import PullGate, YieldsToPulls, may_read
from agent.oci import Descriptor, Digest

LAYER = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def test_a_warm_reads_when_no_pull_fetches_or_a_pull_waits_for_its_layer() -> None:
    assert may_read(0, {}, LAYER)
    assert not may_read(1, {OTHER: 1}, LAYER)
    assert may_read(2, {OTHER: 1, LAYER: 1}, LAYER)


class Chunks:
    """A blob source that hands out `n` chunks and records when each was read."""

    def __init__(self, n: int, log: list[str]) -> None:
        self.n = n
        self.log = log

    @property
    def labels(self) -> Mapping[str, str]:
        return {}

    async def fetch_blob(self, desc: Descriptor, offset: int = 0) -> AsyncIterator[bytes]:
        for i in range(self.n):
            self.log.append(f"chunk {i}")
            yield b"x"
            await asyncio.sleep(0)

    async def fetch_bytes(self, desc: Descriptor) -> bytes:
        return b"x" * self.n


async def read_all(source: YieldsToPulls, digest: str) -> int:
    desc = Descriptor("application/octet-stream", Digest(digest), 3)
    return len(b"".join([c async for c in source.fetch_blob(desc)]))


async def test_a_warm_waits_for_the_pulls_in_flight_then_goes_on() -> None:
    gate, log = PullGate(), []
    warm = YieldsToPulls(Chunks(3, log), gate)
    with gate.pulling([OTHER]):
        task = asyncio.create_task(read_all(warm, LAYER))
        for _ in range(20):
            await asyncio.sleep(0)
        assert log == [] and not task.done(), "nothing read while a pull fetches another layer"
        log.append("pull done")
    assert await task == 3
    assert log == ["pull done", "chunk 0", "chunk 1", "chunk 2"]


async def test_a_warm_pauses_mid_layer_when_a_pull_starts() -> None:
    gate, log = PullGate(), []
    warm = YieldsToPulls(Chunks(3, log), gate)
    stream = warm.fetch_blob(Descriptor("application/octet-stream", Digest(LAYER), 3))
    assert await anext(stream) == b"x"
    with gate.pulling([OTHER]):
        task = asyncio.create_task(anext(stream))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done() and log == ["chunk 0"]
    assert await task == b"x" and log == ["chunk 0", "chunk 1"]


async def test_a_pull_that_needs_the_warms_layer_lets_it_go_on() -> None:
    """The pull joined the warm's download (one per digest): pausing the warm would hold it up."""
    gate, log = PullGate(), []
    warm = YieldsToPulls(Chunks(3, log), gate)
    with gate.pulling([OTHER]):
        task = asyncio.create_task(read_all(warm, LAYER))
        for _ in range(20):
            await asyncio.sleep(0)
        assert log == []
        with gate.pulling([LAYER]):
            assert await asyncio.wait_for(task, 5) == 3
    assert gate.pulls == 0
