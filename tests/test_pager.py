"""The pager between CRIU's lazy-pages daemon and the agent, driven over its real sockets.

The test plays the daemon (page-server requests on the pager's socket, replies read in order) and the
agent (the unix socket the pager connects to). CRIU itself runs in tests/test_postcopy.py; here the
point is what the pager asks the agent for, and what it answers without asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pycriu import images as criu_images

from agent.checkpoint.images import PAGE_SIZE, PE_LAZY
from agent.checkpoint.pageserver import FAULTING, FRESH, HEADER, PS_IOV_ADD_F_PRESENT, PS_IOV_GET, PUSHED, URGENT
from agent.migration.pager import Pager, runs_of
from agent.migration.ranges import PageRanges

PID = 1
OTHER_PID = 2  # a second process of the tree, with the same lazy run
RUN_START = 0x7F0000000000
RUN_PAGES = 40  # the task's only lazy run: read-ahead must never ask past it


def page(vaddr: int) -> bytes:
    return vaddr.to_bytes(8, "little") * (PAGE_SIZE // 8)


def pages(vaddr: int, count: int) -> bytes:
    return b"".join(page(vaddr + n * PAGE_SIZE) for n in range(count))


async def eventually(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    """Wait until `condition()` holds: the tests synchronise on the pager's state, never on sleeps.
    The pager runs in this event loop, so checking after every loop turn misses no state."""
    try:
        async with asyncio.timeout(within):
            while not condition():  # noqa: ASYNC110 (a state check per loop turn, not a timed wait)
                await asyncio.sleep(0)
    except TimeoutError:
        raise AssertionError(f"never happened within {within} s: {what}") from None


async def taken(pager: Pager, replies: int = 0, requests: int = 0) -> None:
    """Until the pager has applied `replies` more agent messages and read `requests` more daemon
    requests than it had when the caller noted them (pass the totals: see `counts`)."""
    await eventually(lambda: pager.replies_read >= replies and pager.requests_read >= requests, "pager")


def counts(pager: Pager) -> tuple[int, int]:
    return pager.replies_read, pager.requests_read


@dataclass
class Agent:
    """The agent's end: records every request and answers it from page()."""

    requests: list[tuple[int, int, int]] = field(default_factory=list)  # (cmd, nr_pages, vaddr)
    fault_notices: int = 0
    writer: asyncio.StreamWriter | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    answer: bool = True

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.connected.set()
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    cmd, nr_pages, vaddr, dst_id = HEADER.unpack(await reader.readexactly(HEADER.size))
                    if cmd == FAULTING:
                        self.fault_notices += 1
                        continue
                    self.requests.append((cmd, nr_pages, vaddr))
                    if self.answer:
                        reply = HEADER.pack(PS_IOV_ADD_F_PRESENT, nr_pages, vaddr, dst_id) + pages(vaddr, nr_pages)
                        writer.write(reply)
        finally:
            writer.close()
            self.gone.set()

    async def push(self, vaddr: int, count: int) -> None:
        await self.reply(vaddr, count, PUSHED)

    async def reply(self, vaddr: int, count: int, mark: int = 0, dst_id: int = PID) -> None:
        assert self.writer is not None
        self.writer.write(HEADER.pack(PS_IOV_ADD_F_PRESENT | mark, count, vaddr, dst_id) + pages(vaddr, count))
        await self.writer.drain()


@dataclass
class Daemon:
    """The lazy-pages daemon's end: GETs out, replies back in request order."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def get(self, vaddr: int, count: int) -> bytes:
        self.ask(vaddr, count)
        got_vaddr, data = await self.next_reply()
        assert (len(data) // PAGE_SIZE, got_vaddr) == (count, vaddr)
        return data

    def ask(self, vaddr: int, count: int, dst_id: int = PID) -> None:
        self.writer.write(HEADER.pack(PS_IOV_GET, count, vaddr, dst_id))

    async def next_reply(self) -> tuple[int, bytes]:
        """(address, pages) of the next reply, whichever request it answers."""
        _, vaddr, data = await self.next_reply_of()
        return vaddr, data

    async def next_reply_of(self) -> tuple[int, int, bytes]:
        """(process, address, pages) of the next reply."""
        async with asyncio.timeout(5):
            _cmd, nr_pages, vaddr, dst_id = HEADER.unpack(await self.reader.readexactly(HEADER.size))
            return dst_id, vaddr, await self.reader.readexactly(nr_pages * PAGE_SIZE)


@pytest.fixture
async def pager(tmp_path: Path) -> AsyncIterator[tuple[Daemon, Agent, Pager]]:
    images = tmp_path / "images"
    images.mkdir()
    for pid in (PID, OTHER_PID):
        with (images / f"pagemap-{pid}.img").open("wb") as fh:
            criu_images.dump(
                {
                    "magic": "PAGEMAP",
                    "entries": [
                        {"pages_id": pid},
                        {"vaddr": RUN_START, "nr_pages": RUN_PAGES, "flags": PE_LAZY, "compat_nr_pages": 0},
                    ],
                },
                fh,
            )
    agent = Agent()
    server = await asyncio.start_unix_server(agent.serve, path=str(tmp_path / "agent.sock"), limit=1 << 22)
    daemon_end, pager_end = socket.socketpair()
    pager = Pager(pager_end, tmp_path / "agent.sock", tmp_path / "pid", tmp_path / "result.json", 5.0, images)
    running = asyncio.create_task(pager.run())
    reader, writer = await asyncio.open_unix_connection(sock=daemon_end, limit=1 << 22)
    try:
        async with asyncio.timeout(5):
            await agent.connected.wait()
        yield Daemon(reader, writer), agent, pager
    finally:
        writer.close()  # the daemon's EOF ends the pager
        async with asyncio.timeout(5):
            await asyncio.gather(running, return_exceptions=True)
            if agent.writer is not None:
                agent.writer.close()  # the agent's end of a pager that is gone
                await agent.gone.wait()
        server.close()
        await server.wait_closed()


async def test_pushed_pages_answer_the_daemon_without_the_agent(pager: tuple[Daemon, Agent, Pager]) -> None:
    daemon, agent, pager_ = pager
    await agent.push(RUN_START, 32)
    await taken(pager_, replies=1)  # the pager has taken the push
    assert await daemon.get(RUN_START + 8 * PAGE_SIZE, 4) == pages(RUN_START + 8 * PAGE_SIZE, 4)
    assert await daemon.get(RUN_START, 1) == page(RUN_START)
    assert agent.requests == []


async def test_a_request_the_push_covers_later_is_answered_from_it(pager: tuple[Daemon, Agent, Pager]) -> None:
    daemon, agent, pager_ = pager
    agent.answer = False  # like a background request the agent parks until the push brings it
    get = asyncio.create_task(daemon.get(RUN_START + 16 * PAGE_SIZE, 16))
    await eventually(lambda: len(agent.requests) >= 2, "the fetch and the read-ahead")
    # The request, and what lies above it in the run (the daemon's next background request).
    assert [(n, v) for _, n, v in agent.requests] == [(16, RUN_START + 16 * PAGE_SIZE), (8, RUN_START + 32 * PAGE_SIZE)]
    await agent.push(RUN_START, RUN_PAGES)
    assert await get == pages(RUN_START + 16 * PAGE_SIZE, 16)
    assert pager_.outstanding == {}  # nothing left to ask again after a reconnect


async def test_a_pushed_page_the_daemon_has_is_not_kept(pager: tuple[Daemon, Agent, Pager]) -> None:
    daemon, agent, pager_ = pager
    assert await daemon.get(RUN_START, 1) == page(RUN_START)  # a fault, answered by the source
    await eventually(lambda: (PID, RUN_START + 15 * PAGE_SIZE) in pager_.cache, "the read-ahead window")
    kept_before = len(pager_.cache)
    replies, _ = counts(pager_)
    await agent.push(RUN_START, 4)
    await taken(pager_, replies=replies + 1)
    assert (PID, RUN_START) not in pager_.cache  # delivered: the daemon never asks for it again
    assert len(pager_.cache) == kept_before  # pages 1-3 were held from the read-ahead already


async def test_sequential_faults_fetch_the_next_window_early(pager: tuple[Daemon, Agent, Pager]) -> None:
    daemon, agent, _ = pager
    for n in range(RUN_PAGES):  # a workload walking its memory, one fault per page
        vaddr = RUN_START + n * PAGE_SIZE
        assert await daemon.get(vaddr, 1) == page(vaddr)
        if n == 8:  # half of the first window used: the next one is on its way already
            await eventually(lambda: len(agent.requests) >= 2, "the next window")
            assert len(agent.requests) == 2, agent.requests
    asked = [(cmd & URGENT != 0, nr, (vaddr - RUN_START) // PAGE_SIZE) for cmd, nr, vaddr in agent.requests]
    # A window of 16 for the first fault; at its half the next (32, clamped to the run's end: 24).
    assert asked == [(True, 16, 0), (True, 24, 16)], asked
    assert all(first + nr <= RUN_PAGES for _, nr, first in asked)  # never past the lazy run


async def test_a_fault_behind_a_waiting_background_request_waits_for_its_first_pages(
    pager: tuple[Daemon, Agent, Pager],
) -> None:
    daemon, agent, pager_ = pager
    agent.answer = False
    fault = RUN_START + 30 * PAGE_SIZE
    await agent.push(fault, 1)
    await agent.push(RUN_START, 4)  # the first 4 pages of the background request are here
    await taken(pager_, replies=2)
    daemon.ask(RUN_START, 16)  # the daemon's background request: waits for all its pages
    await taken(pager_, requests=1)
    daemon.ask(fault, 1)  # then a fault on a page that is here
    # The background request gets the pages here in a row, so that the fault goes next; CRIU asks
    # again for the rest.
    assert await daemon.next_reply() == (RUN_START, pages(RUN_START, 4))
    assert await daemon.next_reply() == (fault, page(fault))
    await eventually(lambda: agent.fault_notices >= 1, "the fault notice")
    assert agent.fault_notices == 1  # the agent heard of the fault (it holds the push back)
    rest = RUN_START + 4 * PAGE_SIZE
    daemon.ask(rest, 12)
    await agent.reply(RUN_START, 16)  # the fetch of the background request's pages
    assert await daemon.next_reply() == (rest, pages(rest, 12))
    assert (PID, RUN_START) not in pager_.cache  # delivered once: not kept


async def test_a_fault_behind_hurries_the_first_pages_of_the_request_ahead(
    pager: tuple[Daemon, Agent, Pager],
) -> None:
    """The background request's pages are on their way in a larger fetch (the source answers that
    last): its first pages are asked for again as a fault's, and the fault waits for those only."""
    daemon, agent, pager_ = pager
    agent.answer = False
    fault = RUN_START + 30 * PAGE_SIZE
    await agent.push(fault, 1)
    await taken(pager_, replies=1)
    daemon.ask(RUN_START, 16)
    await eventually(lambda: len(agent.requests) >= 1, "the background fetch")
    cmd, nr_pages, vaddr = agent.requests[0]  # the background request's own fetch, not urgent
    assert (cmd & URGENT, nr_pages, vaddr) == (0, 16, RUN_START)
    daemon.ask(fault, 1)
    await eventually(lambda: any(cmd & URGENT for cmd, _, _ in agent.requests), "the hurried fetch")
    hurried = [(nr, vaddr) for cmd, nr, vaddr in agent.requests if cmd & URGENT]
    assert hurried == [(16, RUN_START)], agent.requests
    await agent.reply(RUN_START, 16)  # the hurried answer; the background fetch's own comes later
    assert await daemon.next_reply() == (RUN_START, pages(RUN_START, 16))
    assert await daemon.next_reply() == (fault, page(fault))
    await agent.reply(RUN_START, 16)  # the fetch's answer too: taken without harm
    later = RUN_START + 35 * PAGE_SIZE
    replies, _ = counts(pager_)
    await agent.push(later, 1)
    await taken(pager_, replies=replies + 2)  # the fetch's answer, then the push
    assert await daemon.get(later, 1) == page(later)


@pytest.mark.parametrize("owner", [PID, OTHER_PID], ids=["forked-child", "other-process"])
async def test_replies_go_in_the_order_the_daemon_asked(pager: tuple[Daemon, Agent, Pager], owner: int) -> None:
    """CRIU's daemon reads each reply into its oldest open request's buffer and applies it to that
    request's process only at one of its requests' addresses: another process's reply stops it
    ("Out of order read completed", criu/pagemap.c), and a forked child's, which shares its parent's
    image, is dropped without a word (criu/uffd.c), leaving both waiting for ever."""
    daemon, agent, pager_ = pager
    agent.answer = False
    fault = RUN_START + 30 * PAGE_SIZE
    await agent.push(fault, 1)
    await taken(pager_, replies=1)
    daemon.ask(RUN_START, 16, owner)  # a background request of the parent, or of another process
    daemon.ask(RUN_START + 20 * PAGE_SIZE, 4)  # another one, its pages not here either
    daemon.ask(fault, 1)  # then a fault (of the child) on a page that is here
    await taken(pager_, requests=3)
    second = RUN_START + 20 * PAGE_SIZE
    await eventually(lambda: any(v <= second < v + n * PAGE_SIZE for _, n, v in agent.requests), "the fetch")
    # The second request's pages come first (the latest fetch that holds them: for the parent, what
    # the pager fetched above the first request).
    later = next((v, n) for _, n, v in reversed(agent.requests) if v <= second < v + n * PAGE_SIZE)
    replies, _ = counts(pager_)
    await agent.reply(*later)
    await taken(pager_, replies=replies + 1)
    await agent.reply(RUN_START, 16, dst_id=owner)
    assert await daemon.next_reply_of() == (owner, RUN_START, pages(RUN_START, 16))
    assert await daemon.next_reply_of() == (PID, second, pages(second, 4))
    assert await daemon.next_reply_of() == (PID, fault, page(fault))


async def test_a_page_asked_for_again_is_answered_again(pager: tuple[Daemon, Agent, Pager]) -> None:
    """A forked child has its own userfaultfd: the daemon asks again, under the parent's image, for
    pages the parent was given (pushed ones included)."""
    daemon, agent, pager_ = pager
    fault, pushed = RUN_START + 5 * PAGE_SIZE, RUN_START + 30 * PAGE_SIZE
    assert await daemon.get(fault, 1) == page(fault)
    assert await daemon.get(fault, 1) == page(fault)
    await eventually(lambda: not pager_.outstanding, "the read-ahead's answer")
    replies, _ = counts(pager_)
    await agent.push(pushed, 1)
    await taken(pager_, replies=replies + 1)
    assert await daemon.get(pushed, 1) == page(pushed)
    assert await daemon.get(pushed, 1) == page(pushed)


async def test_two_waiting_requests_for_one_page_are_both_answered(pager: tuple[Daemon, Agent, Pager]) -> None:
    """A parent and its forked child fault on the same page before it arrives: one copy, two replies."""
    daemon, agent, pager_ = pager
    agent.answer = False
    fault = RUN_START + 5 * PAGE_SIZE
    daemon.ask(fault, 1)
    daemon.ask(fault, 1)
    await taken(pager_, requests=2)
    await eventually(lambda: len(agent.requests) >= 1, "the fetch")
    [(_, nr_pages, vaddr)] = agent.requests  # fetched once
    await agent.reply(vaddr, nr_pages)
    assert await daemon.next_reply() == (fault, page(fault))
    assert await daemon.next_reply() == (fault, page(fault))


async def test_background_requests_fetch_what_is_above_them(pager: tuple[Daemon, Agent, Pager]) -> None:
    daemon, agent, _ = pager
    assert await daemon.get(RUN_START, 16) == pages(RUN_START, 16)
    await eventually(lambda: len(agent.requests) >= 2, "the fetch above")
    asked = [(nr, (vaddr - RUN_START) // PAGE_SIZE) for _, nr, vaddr in agent.requests]
    assert asked == [(16, 0), (24, 16)], asked  # the rest of the run, clamped to it
    assert await daemon.get(RUN_START + 16 * PAGE_SIZE, 16) == pages(RUN_START + 16 * PAGE_SIZE, 16)
    assert len(agent.requests) == 2  # the daemon's next background request was here already


async def test_a_daemon_that_stops_asking_fails_the_pager(pager: tuple[Daemon, Agent, Pager]) -> None:
    """Silence with everything answered and no close is a stalled daemon: the pager ends, failed
    (and kills the workload, which could never get its pages)."""
    daemon, _, pager_ = pager
    pager_.daemon_stall = 0.3
    await asyncio.sleep(0.6)
    assert not pager_.result.exists()  # not armed before the daemon's first request
    assert await daemon.get(RUN_START, 1) == page(RUN_START)
    for _ in range(100):  # the stall shows within 0.3 s plus one watchdog tick
        if pager_.result.exists():
            break
        await asyncio.sleep(0.05)
    result = json.loads(pager_.result.read_text())
    assert result["ok"] is False and "stalled" in result["error"], result


async def test_read_ahead_leaves_out_what_the_daemon_has(pager: tuple[Daemon, Agent, Pager]) -> None:
    """A page the daemon was given it never asks for again: a read-ahead window stops before it, and
    the next one leaves it out, or it would cross a second time."""
    daemon, agent, pager_ = pager
    replies, _ = counts(pager_)
    await agent.push(RUN_START + 4 * PAGE_SIZE, 4)  # pages 4-7 come by the push ...
    await taken(pager_, replies=replies + 1)
    assert await daemon.get(RUN_START + 4 * PAGE_SIZE, 4) == pages(RUN_START + 4 * PAGE_SIZE, 4)  # ... and go
    assert await daemon.get(RUN_START, 1) == page(RUN_START)  # a fault below them
    await eventually(lambda: not pager_.outstanding, "the read-ahead's answer")
    window = [(nr, (vaddr - RUN_START) // PAGE_SIZE) for _, nr, vaddr in agent.requests]
    assert window == [(4, 0)], window  # pages 0-3, not the 16 of a fresh window over 4-7
    assert all(cmd & FRESH for cmd, _, _ in agent.requests)  # none of it had reached the daemon


async def test_a_request_for_pages_the_daemon_had_is_not_fresh(pager: tuple[Daemon, Agent, Pager]) -> None:
    """A forked child's request for pages its parent was given: the agent must ask the source for
    all of it (the pager dropped them), so it goes without the FRESH mark."""
    daemon, agent, pager_ = pager
    replies, _ = counts(pager_)
    await agent.push(RUN_START, RUN_PAGES)
    await taken(pager_, replies=replies + 1)
    assert await daemon.get(RUN_START, 16) == pages(RUN_START, 16)
    assert await daemon.get(RUN_START, 16) == pages(RUN_START, 16)  # asked again: fetched again
    assert [(cmd & FRESH, nr) for cmd, nr, _ in agent.requests] == [(0, 16)]


def test_runs_of() -> None:
    assert runs_of([]) == []
    assert runs_of([True, True, False, True, False, False, True]) == [(0, 2), (3, 1), (6, 1)]


def test_page_ranges_missing_and_count() -> None:
    ranges = PageRanges()
    assert ranges.missing(PID, RUN_START, 10) == [(0, 10)] and ranges.count(PID, RUN_START, 10) == 0
    ranges.add(PID, RUN_START + 2 * PAGE_SIZE, 3)  # pages 2-4
    ranges.add(PID, RUN_START + 8 * PAGE_SIZE, 1)  # page 8
    assert ranges.missing(PID, RUN_START, 10) == [(0, 2), (5, 3), (9, 1)]
    assert ranges.count(PID, RUN_START, 10) == 4
    assert ranges.missing(PID, RUN_START + 3 * PAGE_SIZE, 2) == []  # inside one range
    assert ranges.missing(PID, RUN_START + 4 * PAGE_SIZE, 4) == [(1, 3)]  # starts in one
    assert ranges.missing(PID, RUN_START + 9 * PAGE_SIZE, 5) == [(0, 5)]  # past the last
    assert ranges.missing(OTHER_PID, RUN_START, 2) == [(0, 2)]  # by task


def test_page_ranges_merge_and_cover() -> None:
    ranges = PageRanges()
    ranges.add(PID, RUN_START, 4)
    ranges.add(PID, RUN_START + 8 * PAGE_SIZE, 4)
    assert ranges.covers(PID, RUN_START + PAGE_SIZE, 3)
    assert not ranges.covers(PID, RUN_START + 2 * PAGE_SIZE, 4)  # runs into the hole at 4..7
    assert not ranges.covers(PID + 1, RUN_START, 1)
    ranges.add(PID, RUN_START + 4 * PAGE_SIZE, 4)  # fills the hole: one range
    assert len(ranges) == 1 and ranges.covers(PID, RUN_START, 12)
    ranges.add(PID, RUN_START - 2 * PAGE_SIZE, 1)  # before, not touching
    assert len(ranges) == 2 and not ranges.covers(PID, RUN_START - 2 * PAGE_SIZE, 3)


def test_the_pager_process_runs_realtime() -> None:
    # Agents run as root, and so do the tests (a missing prerequisite fails, never skips).
    # In a child process: the test runner itself must stay an ordinary task.
    code = (
        "import os; from agent.migration.pager import run_realtime; "
        "print(run_realtime(), os.sched_getscheduler(0) == os.SCHED_FIFO, os.sched_getparam(0).sched_priority)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.split() == ["True", "True", "1"], out


async def test_a_background_request_waits_out_a_burst_of_faults(pager: tuple[Daemon, Agent, Pager]) -> None:
    daemon, agent, pager_ = pager
    pager_.fault_burst = 2.0  # seconds: wide, so that a slow machine cannot end the burst by itself
    await agent.push(RUN_START, RUN_PAGES)
    await taken(pager_, replies=1)
    first, second, background = RUN_START + 30 * PAGE_SIZE, RUN_START + 31 * PAGE_SIZE, RUN_START
    assert await daemon.get(first, 1) == page(first)
    loop = asyncio.get_running_loop()
    _, requests = counts(pager_)
    daemon.ask(background, 16)  # what the daemon sends once a fault is answered: held
    await taken(pager_, requests=requests + 1)
    daemon.ask(second, 1)  # a fault behind it: the background request goes at once, the fault next
    faulted = loop.time()
    assert await daemon.next_reply() == (background, pages(background, 16))
    assert await daemon.next_reply() == (second, page(second))
    assert loop.time() - faulted < 1.5  # at once, not after the burst (2 s)
    later = background + 16 * PAGE_SIZE
    daemon.ask(later, 16)  # no fault behind this one: answered once the burst is over
    async with asyncio.timeout(10):
        assert await daemon.next_reply() == (later, pages(later, 16))
    assert loop.time() - faulted > 1.9


# Not "-1": should the guard regress, kill(-1) as root would take down every process on the host.
@pytest.mark.parametrize(("pid_text", "workload_dies"), [("real", True), ("0", False)])
def test_the_guard_kills_the_workload_and_nothing_else(tmp_path: Path, pid_text: str, workload_dies: bool) -> None:
    """The pager kills the restored task's init when its pages cannot come. A pid file that names no
    process (containerd knows no pid before Start) must not turn kill() onto a process group."""
    workload = subprocess.Popen(["sleep", "30"], start_new_session=True)
    pid_file = tmp_path / "pid"
    pid_file.write_text(str(workload.pid) if pid_text == "real" else pid_text)
    # The pager's side runs in a child in its own session and process group: kill(0) would end it.
    code = (
        "import sys; from pathlib import Path; from agent.migration.pager import Pager; "
        "p = Pager.__new__(Pager); p.pid_file = Path(sys.argv[1]); p._kill_workload(); print('alive')"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(pid_file)],
            capture_output=True,
            text=True,
            timeout=30,
            start_new_session=True,
        )
        assert (out.returncode, out.stdout.strip()) == (0, "alive"), out
        if workload_dies:
            assert workload.wait(timeout=5) == -signal.SIGKILL
        else:
            time.sleep(0.2)
            assert workload.poll() is None  # still running: nothing was signalled
    finally:
        workload.kill()
        workload.wait()
