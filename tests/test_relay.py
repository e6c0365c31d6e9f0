"""The target agent's relay between the pager and the migration stream, over a real stream channel.

The test plays the pager (the unix socket the relay listens on) and the source agent (the other end
of a real channel on loopback TCP). CRIU and the pager process run in tests/test_postcopy.py; here the
point is how the relay paces the source's push: its credits (`push_ack`) wait while the workload
faults, and the first ones come only from the relay.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.checkpoint.images import PAGE_SIZE
from agent.checkpoint.pageserver import FAULTING, FRESH, HEADER, PS_IOV_ADD_F_PRESENT, PS_IOV_GET, PUSHED
from agent.migration.link import ControlIn, Link, page_key
from agent.migration.pagerproc import PostcopyPaths
from agent.migration.pushflow import PUSH_WINDOW
from agent.migration.ranges import PageRanges
from agent.migration.relay import TargetRelay
from tests.harness.links import link_pair

PID = 7
VADDR = 0x7F0000000000
HOLD = 0.5
"""The relay's push hold in these tests: 10x the production one, so that a fault loop delayed by a
busy CI (tens of ms) still keeps the credits back."""


class Ends:
    def __init__(self, source: Link, pager: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.source = source
        self.pager_reader, self.pager_writer = pager

    async def acks(self, within: float) -> int:
        """How many push credits the source receives within `within` seconds."""
        count = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (left := deadline - loop.time()) > 0:
            try:
                async with asyncio.timeout(left):
                    msg = await self.source.recv()
            except TimeoutError:
                break
            assert isinstance(msg, ControlIn) and msg.type == "push_ack", msg
            count += 1
        return count

    async def push(self, vaddr: int, count: int) -> None:
        await self.source.send("pushed", pagemap=f"pagemap-{PID}.img", vaddr=vaddr, nr_pages=count, held=[])
        keys = array("Q", (page_key(0, vaddr + n * PAGE_SIZE) for n in range(count)))
        await self.source.send_raw_pages(keys, bytes(count * PAGE_SIZE))

    def ask(self, vaddr: int, count: int, mark: int = 0) -> None:
        self.pager_writer.write(HEADER.pack(PS_IOV_GET | mark, count, vaddr, PID))

    async def from_pager(self) -> tuple[int, int, int]:
        """(cmd, nr_pages, vaddr) of the next message the relay gives the pager (its pages read)."""
        async with asyncio.timeout(5):
            cmd, nr_pages, vaddr, _ = HEADER.unpack(await self.pager_reader.readexactly(HEADER.size))
            await self.pager_reader.readexactly(nr_pages * PAGE_SIZE)
        return cmd, nr_pages, vaddr

    async def requests(self) -> list[tuple[int, int]]:
        """(nr_pages, vaddr) of the page requests the source receives until it has none for a moment."""
        out = []
        while True:
            try:
                async with asyncio.timeout(0.5):
                    msg = await self.source.recv()
            except TimeoutError:
                return out
            if isinstance(msg, ControlIn) and msg.type == "ps_req":
                _, nr_pages, vaddr, _ = HEADER.unpack(bytes.fromhex(msg.body["raw"]))
                out.append((nr_pages, vaddr))

    def fault(self) -> None:
        self.pager_writer.write(HEADER.pack(FAULTING, 0, 0, 0))


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[Ends]:
    async with link_pair(tmp_path, "mig-relay") as (source, target):
        relay = TargetRelay(PostcopyPaths(tmp_path), on_pages=lambda _: None)
        relay.push_hold = HOLD
        relay.pushed = PageRanges()
        await relay.listen()
        pager = await asyncio.open_unix_connection(str(relay.paths.agent_socket))
        running = asyncio.create_task(relay.relay(target, within=5))
        try:
            yield Ends(source, pager)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            pager[1].close()
            await relay.close()


async def test_the_push_gets_its_first_credits_from_the_target(relay: Ends) -> None:
    assert await relay.acks(within=1.0) == PUSH_WINDOW


async def test_push_credits_wait_while_the_workload_faults(relay: Ends) -> None:
    assert await relay.acks(within=1.0) == PUSH_WINDOW
    relay.fault()
    await relay.push(VADDR, 4)
    # The pages go to the pager at once ...
    async with asyncio.timeout(5):
        cmd, nr_pages, vaddr, dst_id = HEADER.unpack(await relay.pager_reader.readexactly(HEADER.size))
        await relay.pager_reader.readexactly(nr_pages * PAGE_SIZE)
    assert (cmd & PUSHED, nr_pages, vaddr, dst_id) == (PUSHED, 4, VADDR, PID)
    # ... but the credit back waits as long as faults keep coming (every HOLD / 5: a busy machine can
    # delay one by a fraction of the hold, not by all of it),
    faulting = asyncio.create_task(keep_faulting(relay, seconds=10 * HOLD))
    assert await relay.acks(within=8 * HOLD) == 0
    await faulting
    # and comes once they stop.
    assert await relay.acks(within=2.0) == 1


async def keep_faulting(relay: Ends, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        relay.fault()
        await asyncio.sleep(HOLD / 5)


async def test_a_fresh_request_loses_what_a_push_handed_the_pager(relay: Ends) -> None:
    """The pager asked for pages a push had already handed it (unread in its socket): the source is asked
    only for the rest, and that comes back to the pager as pushed pages, not as an answer."""
    await relay.acks(within=0.5)
    await relay.push(VADDR + 4 * PAGE_SIZE, 4)  # pages 4-7
    assert await relay.from_pager() == (PS_IOV_ADD_F_PRESENT | PUSHED, 4, VADDR + 4 * PAGE_SIZE)
    relay.fault()  # faulting: nothing is parked for the push, requests go to the source at once
    relay.ask(VADDR, 16, FRESH)
    relay.ask(VADDR + 4 * PAGE_SIZE, 4, FRESH)  # every page pushed: nothing to ask
    assert await relay.requests() == [(4, VADDR), (8, VADDR + 8 * PAGE_SIZE)]
    header = HEADER.pack(PS_IOV_ADD_F_PRESENT, 8, VADDR + 8 * PAGE_SIZE, PID)
    await relay.source.send("ps_rep", header=header.hex(), local=[])
    keys = array("Q", (page_key(0, VADDR + (8 + n) * PAGE_SIZE) for n in range(8)))
    await relay.source.send_raw_pages(keys, bytes(8 * PAGE_SIZE))
    assert await relay.from_pager() == (PS_IOV_ADD_F_PRESENT | PUSHED, 8, VADDR + 8 * PAGE_SIZE)


async def test_a_request_that_is_not_fresh_goes_whole(relay: Ends) -> None:
    """Pages the daemon had before (a forked child asks again): the pager dropped them, so the source
    sends them again even where a push brought them."""
    await relay.acks(within=0.5)
    await relay.push(VADDR, 8)
    await relay.from_pager()
    relay.fault()
    relay.ask(VADDR, 8)
    assert await relay.requests() == [(8, VADDR)]


async def test_an_answer_without_the_pages_a_push_carried(relay: Ends) -> None:
    """The source leaves out of its answer to a fresh request the pages its push carried ahead of it on
    the link: the rest goes to the pager as pushed pages, which complete its request."""
    await relay.acks(within=0.5)
    header = HEADER.pack(PS_IOV_ADD_F_PRESENT, 8, VADDR, PID)
    await relay.source.send("ps_rep", header=header.hex(), local=[], pushed=[[2, 3]])  # pages 2-4 were pushed
    keys = array("Q", (page_key(0, VADDR + n * PAGE_SIZE) for n in (0, 1, 5, 6, 7)))
    await relay.source.send_raw_pages(keys, bytes(5 * PAGE_SIZE))
    assert await relay.from_pager() == (PS_IOV_ADD_F_PRESENT | PUSHED, 2, VADDR)
    assert await relay.from_pager() == (PS_IOV_ADD_F_PRESENT | PUSHED, 3, VADDR + 5 * PAGE_SIZE)
