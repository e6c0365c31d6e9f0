"""The pager: the one process that holds the target's end of the lazy-pages daemon's page socket.

While a migrated task runs on the target with pages still on the source (POSTCOPY), the daemon's
page requests pass through here to the agent, which carries them over the migration stream. The
pager is its own process, in its own session, so that an agent restart does not cut the daemon off:
it keeps the unanswered requests and sends them again when the (new) agent is back.

It keeps what the source pushes (the agent hands each pushed batch over unasked) and answers the
daemon from it. And it reads ahead. The daemon asks for one page per fault; a workload that walks
its memory faults on every page, each a round trip to the source. A fault request goes out for a
window of pages that grows while faults stay sequential, and the next window goes out as soon as
the current one is entered (the kernel's asynchronous read-ahead), so a sequential walker does not
wait on the network at each window's end. The daemon's background requests walk up from its lowest
missing page, so what lies above the last one is fetched too. The pages nobody asked for yet wait
here and answer the daemon's next requests without the network. Read-ahead never asks for a page that
is here, on its way, or given to the daemon already (it would cross twice), and a request none of whose
pages reached the daemon goes marked FRESH: the agent then leaves out what a push brought already.

Replies go in the order the daemon asked (see _answer_count), but a background request with a fault
behind it gets only what is here of it, so that the fault goes next. The agent hears that the
workload faults, so that it holds the push back meanwhile.
Every page it keeps is one the daemon has not been given yet, and the daemon takes each page once,
so it holds at most the workload's lazy memory (the push may run that far ahead of the daemon).

It also guards the workload. If the daemon stopped before every page arrived, or the agent stays
away longer than --reconnect-timeout, or the agent aborts the migration (SIGTERM), the restored task
would read zero-filled memory where its pages should be. The pager kills it first.

Usage: python -m agent.migration.pager --ps-fd N --agent-socket PATH --pid-file PATH --result PATH
                                      --images DIR
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.checkpoint.images import PAGE_SIZE, read_pagemap
from agent.checkpoint.pageserver import (
    FAULTING,
    FRESH,
    HEADER,
    PS_IOV_ADD_F_PRESENT,
    PS_IOV_CLOSE,
    PUSHED,
    STATUS,
    URGENT,
    PageServerError,
    Request,
)
from agent.malloc import keep_freed_memory
from agent.migration.ranges import PageRanges
from core.files import atomic_write

MIN_WINDOW = 16  # pages fetched for a fault at a new place
MAX_WINDOW = 256  # 1 MiB: a hurried request waits behind at most one such reply
WINDOW_GROWTH = 4  # the window grows this much while faults keep following each other
FAULT_BURST = 0.001  # seconds: faults this close hold background answers back (_answer_count)
FAULT_NOTICE_EVERY = 0.01  # seconds: how often, at most, the agent hears that the workload faults
BACKGROUND_AHEAD = 1024  # pages fetched above the daemon's last background request
DAEMON_STALL = 10.0
"""Seconds the daemon may go without asking, with every request answered and no close: it keeps
asking in the background until every page is in, so silence means it stalled (seen with CRIU 4.2.1
and workloads that fork all the time). The workload cannot get its pages then: it fails the
documented way (killed here; the source resumes its frozen copy)."""
BACKGROUND_SLICE = 256  # pages: a larger background request is answered in part (CRIU asks again for
# the rest), because the daemon reads replies in order and a fault must not wait behind 4 MiB


def runs_of(flags: list[bool]) -> list[tuple[int, int]]:
    """(first, count) of the True runs."""
    out: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if not flag:
            continue
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


@dataclass
class Slot:
    """One daemon request, answered once every page it asks for is here (a fault may go first)."""

    asked: Request
    ready: bool = False
    """Every page it asks for is here."""
    reply: bytes | None = None
    """A close's answer (the source's status)."""
    asked_at: float = field(default_factory=time.monotonic)
    request: Request = field(init=False)
    """What we answer: a large background request only in part."""

    def __post_init__(self) -> None:
        self.request = self.asked
        if not self.asked.closes and self.asked.nr_pages > BACKGROUND_SLICE:
            cmd, vaddr, dst_id = self.asked.cmd, self.asked.vaddr, self.asked.dst_id
            self.request = Request.parse(HEADER.pack(cmd, BACKGROUND_SLICE, vaddr, dst_id))


class Pager:
    def __init__(
        self, ps: socket.socket, agent_socket: Path, pid_file: Path, result: Path, timeout: float, images: Path
    ) -> None:
        self.ps = ps
        self.images = images
        self._lazy_runs: dict[int, list[tuple[int, int]]] = {}
        """dst_id -> its lazy [start, end) runs, from its pagemap: read-ahead never asks past one."""
        self.agent_socket = agent_socket
        self.pid_file = pid_file
        self.result = result
        self.timeout = timeout
        self.slots: collections.deque[Slot] = collections.deque()
        """The daemon's unanswered requests, in the order it asked."""
        self.outstanding: dict[tuple[int, int], Request] = {}
        """Requests sent to the source (read-ahead supersets included) by (task, address): the source
        answers faults first, so answers come in its order, not ours."""
        self.cache: dict[tuple[int, int], bytes | memoryview] = {}
        self.in_flight: set[tuple[int, int]] = set()
        self.delivered = PageRanges()
        """What the daemon has been given: a page arriving after that is kept only if asked (_keeps)."""
        self.pages = 0
        self.requests_read = 0  # daemon requests taken in, each handled as far as it can be
        self.replies_read = 0  # agent messages (answers, pushes) taken in and applied
        self.closed = False  # the daemon's close was answered: every page is on this host
        self.realtime = False  # scheduled SCHED_FIFO (run_realtime)
        self._agent: asyncio.StreamWriter | None = None
        self._daemon: asyncio.StreamWriter | None = None
        self._window = MIN_WINDOW
        self._next_fault = -1
        self._fault_noticed = 0.0
        self._last_fault = 0.0
        self.fault_burst = FAULT_BURST
        self.daemon_stall = DAEMON_STALL
        self._last_request: float | None = None  # armed by the first request: the pager starts before the restore
        self._held_flush: asyncio.TimerHandle | None = None
        self._hurried: set[tuple[int, int]] = set()
        """Requests sent ahead of an outstanding one at the same address (_hurry), not yet answered."""
        self._background_next: dict[int, int] = {}
        """dst_id -> the end of what is fetched ahead of the daemon's background requests."""
        self._started = time.monotonic()
        self.fault_waits: list[tuple[float, float]] = []
        """(seconds since start, seconds the daemon waited) of each fault's answer: the stalls the
        workload saw."""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        ps_reader, self._daemon = await asyncio.open_unix_connection(sock=self.ps, limit=1 << 16)
        tasks = {
            asyncio.create_task(self._requests(ps_reader), name="requests"),
            asyncio.create_task(self._agent_loop(), name="agent"),
            asyncio.create_task(stop.wait(), name="sigterm"),
            asyncio.create_task(self._watch_daemon(), name="watchdog"),
        }
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        finished = next(iter(done))
        error = None if finished.cancelled() else finished.exception()
        if finished.get_name() == "requests" and isinstance(error, ConnectionError):
            error = None  # reset while answering it: the daemon died with replies unread, as at its EOF
        if finished.get_name() == "requests" and error is None and self.closed:
            self._write_result(ok=True, error="")
            return 0
        if finished.get_name() == "sigterm":
            reason = "the migration was aborted"
        elif error is not None:
            reason = str(error)
        else:
            reason = "the lazy-pages daemon stopped before every page arrived"
        self._kill_workload()
        self._write_result(ok=False, error=reason)
        return 1

    async def _watch_daemon(self) -> None:
        """Fails once the daemon has been silent for daemon_stall seconds with nothing left to answer."""
        while True:
            await asyncio.sleep(min(1.0, self.daemon_stall / 4))
            last = self._last_request
            if last is not None and not self.slots and time.monotonic() - last > self.daemon_stall:
                raise PageServerError(
                    f"the lazy-pages daemon stopped asking for pages for {self.daemon_stall:.0f} s "
                    "without closing: it stalled"
                )

    # ----- daemon -> source ------------------------------------------------------------------------

    async def _requests(self, reader: asyncio.StreamReader) -> None:
        """Daemon -> agent. Ends at the daemon's EOF (after its close, or because it died)."""
        while True:
            try:
                raw = await reader.readexactly(HEADER.size)
            except (asyncio.IncompleteReadError, ConnectionError):  # a reset: it died with replies unread
                return
            slot = Slot(Request.parse(raw))
            request = slot.request
            self._last_request = slot.asked_at
            self.slots.append(slot)
            if request.nr_pages == 1:
                self._last_fault = slot.asked_at
                self._notice_fault(slot.asked_at)
            if request.closes:
                self._fetch(request)
                self.requests_read += 1
                continue
            pages = self._keys(request)
            if all(key in self.cache for key in pages):
                slot.ready = True
                self._keep_ahead(request)
                await self._flush()
            elif self._missing(request):
                self._fetch(self._read_ahead(request))
            if slot.asked.nr_pages > request.nr_pages:  # the rest of a background request comes next
                self._prefetch(slot.asked, request.nr_pages)
            self._background_ahead(slot.asked)
            if request.nr_pages == 1 and not slot.ready:
                await self._flush()  # what waits ahead of the fault may need hurrying (_answer_count)
            self.requests_read += 1

    def _notice_fault(self, now: float) -> None:
        """The agent holds the push back while the workload faults: the push's CPU time (reading,
        sealing, unsealing, handing over) would stretch every fault's round trip."""
        if self._agent is None or now - self._fault_noticed < FAULT_NOTICE_EVERY:
            return
        self._fault_noticed = now
        with contextlib.suppress(OSError):
            self._agent.write(HEADER.pack(FAULTING, 0, 0, 0))

    def _keys(self, request: Request) -> list[tuple[int, int]]:
        return [(request.dst_id, request.vaddr + n * PAGE_SIZE) for n in range(request.nr_pages)]

    def _read_ahead(self, request: Request) -> Request:
        """A fault (a small request) becomes a window of pages starting at it."""
        if request.nr_pages >= MIN_WINDOW:
            return request
        sequential = request.vaddr == self._next_fault
        self._window = min(self._window * WINDOW_GROWTH, MAX_WINDOW) if sequential else MIN_WINDOW
        window = self._clamp(request.dst_id, request.vaddr, self._window) or request.nr_pages
        self._next_fault = request.vaddr + window * PAGE_SIZE
        fresh = self._fresh(request.dst_id, request.vaddr, window)
        fresh[0] = True  # the fault's own page: asked for, whatever the daemon had
        window = runs_of(fresh)[0][1]  # up to the first page that is here or on its way already
        raw = HEADER.pack(request.cmd | URGENT, window, request.vaddr, request.dst_id)
        return Request.parse(raw)

    def _keep_ahead(self, request: Request) -> None:
        """A fault answered from the current window: once half of it is used, fetch the next one."""
        if request.nr_pages >= MIN_WINDOW or self._next_fault < 0:
            return
        left = (self._next_fault - request.vaddr) // PAGE_SIZE
        if not 0 < left <= self._window:
            return
        start = self._next_fault
        self._window = min(self._window * WINDOW_GROWTH, MAX_WINDOW)
        window = self._clamp(request.dst_id, start, self._window)
        if not window:  # the end of the run: the next fault starts a new window
            self._next_fault = -1
            return
        self._next_fault = start + window * PAGE_SIZE
        raw = HEADER.pack(request.cmd | URGENT, window, start, request.dst_id)
        self._fetch_missing(Request.parse(raw))

    def _background_ahead(self, asked: Request) -> None:
        """The daemon's background requests walk up from its lowest missing page: keep the pages
        above the last one here, so the fault it sends next never waits behind a trip to the source."""
        if asked.nr_pages < MIN_WINDOW:
            return
        end = asked.vaddr + asked.nr_pages * PAGE_SIZE
        frontier = self._background_next.get(asked.dst_id, -1)
        if frontier - end >= BACKGROUND_AHEAD * PAGE_SIZE // 2:
            return
        start = max(end, frontier)
        window = self._clamp(asked.dst_id, start, BACKGROUND_AHEAD)
        if not window:
            return
        self._background_next[asked.dst_id] = start + window * PAGE_SIZE
        self._fetch_slices(asked.cmd, asked.dst_id, start, window)

    def _clamp(self, dst_id: int, vaddr: int, nr_pages: int) -> int:
        """How many of `nr_pages` from `vaddr` lie in one lazy run (0: none). The source's page server
        serves only its lazy runs; a request that starts outside one would end its session."""
        runs = self._lazy_runs.get(dst_id)
        if runs is None:
            runs = self._lazy_runs[dst_id] = self._read_runs(dst_id)
        for start, end in runs:
            if start <= vaddr < end:
                return min(nr_pages, (end - vaddr) // PAGE_SIZE)
        return 0

    def _read_runs(self, dst_id: int) -> list[tuple[int, int]]:
        try:
            pagemap = read_pagemap(self.images / f"pagemap-{dst_id}.img")
        except (OSError, ValueError, KeyError):
            return []  # no read-ahead for this task: its faults are asked as they come
        return [(r.vaddr, r.vaddr + r.nr_pages * PAGE_SIZE) for r in pagemap.lazy_ranges]

    def _prefetch(self, asked: Request, answered: int) -> None:
        """Fetch the part of a background request we answer later. The daemon asks again for the
        rest after each slice: what lies below the background frontier was fetched (or found here)
        on an earlier pass, and looking at it page by page again cost more than the rest of the
        pager's work together."""
        start = asked.vaddr + answered * PAGE_SIZE
        end = asked.vaddr + asked.nr_pages * PAGE_SIZE
        frontier = self._background_next.get(asked.dst_id, -1)
        if start < frontier:
            if frontier >= end:
                return
            start = frontier
        self._background_next[asked.dst_id] = max(frontier, end)
        self._fetch_slices(asked.cmd, asked.dst_id, start, (end - start) // PAGE_SIZE)

    def _fetch_slices(self, cmd: int, dst_id: int, start: int, nr_pages: int) -> None:
        """Background pages in slices: the source answers faults first, but only between replies,
        so a fault never waits behind more than one slice on the link."""
        for first in range(0, nr_pages, BACKGROUND_SLICE):
            count = min(BACKGROUND_SLICE, nr_pages - first)
            self._fetch_missing(Request.parse(HEADER.pack(cmd, count, start + first * PAGE_SIZE, dst_id)))

    def _key(self, request: Request) -> tuple[int, int]:
        return (-1, -1) if request.closes else (request.dst_id, request.vaddr)

    def _missing(self, request: Request) -> bool:
        """Some page of it is neither here nor asked for."""
        return any(key not in self.cache and key not in self.in_flight for key in self._keys(request))

    def _fetch_missing(self, request: Request) -> None:
        """Read-ahead: fetch the runs of it that are neither here, nor asked for, nor given to the daemon
        already (a page the daemon has, it does not ask for again: fetching it would send it twice)."""
        for first, count in runs_of(self._fresh(request.dst_id, request.vaddr, request.nr_pages)):
            self._fetch(request.part(first, count))

    def _fresh(self, dst_id: int, vaddr: int, nr_pages: int) -> list[bool]:
        """Which of the pages are neither here, nor on their way, nor given to the daemon already (one
        range lookup for the delivered ones: this runs for every read-ahead page)."""
        fresh = [False] * nr_pages
        cache, in_flight = self.cache, self.in_flight
        for first, count in self.delivered.missing(dst_id, vaddr, nr_pages):
            for n in range(first, first + count):
                key = (dst_id, vaddr + n * PAGE_SIZE)
                fresh[n] = key not in cache and key not in in_flight
        return fresh

    def _fetch(self, request: Request) -> None:
        if self._key(request) in self.outstanding:
            return  # the same range is asked already
        if not request.closes and not self.delivered.count(request.dst_id, request.vaddr, request.nr_pages):
            request = request.marked(FRESH)  # the agent may leave out what a push brought already
        self.outstanding[self._key(request)] = request
        if not request.closes:
            self.in_flight.update(self._keys(request))
        if self._agent is not None:
            with contextlib.suppress(OSError):
                self._agent.write(request.raw)

    # ----- source -> daemon ------------------------------------------------------------------------

    async def _agent_loop(self) -> None:
        """Reconnecting to the agent; replies are taken whole, so a cut never splits one."""
        lost_at = time.monotonic()
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.agent_socket), limit=1 << 22)
            except OSError:
                if time.monotonic() - lost_at > self.timeout:
                    raise PageServerError(f"the agent stayed away for more than {self.timeout:.0f} s") from None
                await asyncio.sleep(0.1)
                continue
            self._agent = writer
            self._hurried.clear()
            for request in list(self.outstanding.values()):  # unanswered ones again: a GET is idempotent
                writer.write(request.raw)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await self._replies(reader)
            self._agent = None
            writer.close()
            lost_at = time.monotonic()

    async def _replies(self, reader: asyncio.StreamReader) -> None:
        """Each answer starts with a 32-byte header: a page-server one, or a close's status wrapped."""
        while True:
            header = await reader.readexactly(HEADER.size)
            cmd, nr_pages, vaddr, dst_id = HEADER.unpack(header)
            if cmd == PS_IOV_CLOSE:
                self.outstanding.pop((-1, -1), None)
                slot = next(s for s in self.slots if s.request.closes and s.reply is None)
                slot.reply = STATUS.pack(int(nr_pages) - (1 << 32) if nr_pages >= 1 << 31 else int(nr_pages))
            else:
                data = memoryview(await reader.readexactly(nr_pages * PAGE_SIZE))
                if cmd & PUSHED:
                    self._take_push(dst_id, vaddr, nr_pages, data)
                else:
                    key = (dst_id, vaddr)
                    request = self.outstanding.get(key)
                    if key in self._hurried and (request is None or request.nr_pages != nr_pages):
                        self._hurried.discard(key)  # the hurried pages: the fetch that holds them comes too
                    else:
                        request = self.outstanding.pop(key, None)
                        if request is None:
                            self.replies_read += 1
                            continue  # answered twice across a reconnect: the first answer counted
                        self.in_flight.difference_update(self._keys(request))
                    for n in range(nr_pages):
                        address = vaddr + n * PAGE_SIZE
                        if self._keeps(dst_id, address):
                            self.cache[(dst_id, address)] = data[n * PAGE_SIZE : (n + 1) * PAGE_SIZE]
                self._fill_waiting()
            await self._flush()
            self.replies_read += 1

    def _take_push(self, dst_id: int, vaddr: int, nr_pages: int, data: memoryview) -> None:
        """Pushed pages: kept until the daemon asks for them, unless it has them already; a request
        to the source they cover is no longer waited for."""
        cache = self.cache
        fresh = [False] * nr_pages  # not given to the daemon yet: one range lookup for the whole batch
        for first, count in self.delivered.missing(dst_id, vaddr, nr_pages):
            fresh[first : first + count] = [True] * count
        for n in range(nr_pages):
            address = vaddr + n * PAGE_SIZE
            if fresh[n] or self._asked_for(dst_id, address):
                cache.setdefault((dst_id, address), data[n * PAGE_SIZE : (n + 1) * PAGE_SIZE])
        end = vaddr + nr_pages * PAGE_SIZE
        for key, request in list(self.outstanding.items()):
            if request.closes or request.dst_id != dst_id:
                continue
            if request.vaddr < end and vaddr < request.vaddr + request.nr_pages * PAGE_SIZE:  # overlaps
                keys = self._keys(request)
                if all(k in self.cache or self.delivered.covers(k[0], k[1], 1) for k in keys):
                    del self.outstanding[key]
                    self.in_flight.difference_update(keys)

    def _keeps(self, dst_id: int, address: int) -> bool:
        """Whether an arriving page is kept: one the daemon has had already only if a request waits
        for it. A forked child has its own userfaultfd, and the daemon asks again, under the
        parent's image, for pages the parent was given before the fork."""
        return not self.delivered.covers(dst_id, address, 1) or self._asked_for(dst_id, address)

    def _asked_for(self, dst_id: int, address: int) -> bool:
        """A request still waiting covers the page (a parent's and its child's may both)."""
        return any(
            not slot.request.closes
            and slot.request.dst_id == dst_id
            and slot.request.vaddr <= address < slot.request.vaddr + slot.request.nr_pages * PAGE_SIZE
            for slot in self.slots
        )

    def _fill_waiting(self) -> None:
        for slot in self.slots:
            if slot.ready or slot.request.closes:
                continue
            pages = self._keys(slot.request)
            if all(key in self.cache for key in pages):
                slot.ready = True
            elif self._missing(slot.request):
                self._fetch(slot.request)  # what it waited for came short (a clamped reply): ask plainly

    def _from_cache(self, dst_id: int, vaddr: int, count: int) -> bytes:
        """A reply; its pages leave the cache unless another waiting request wants them too."""
        keys = [(dst_id, vaddr + n * PAGE_SIZE) for n in range(count)]
        data = b"".join(self.cache[key] for key in keys)
        end = vaddr + count * PAGE_SIZE
        # One pass over the waiting requests per reply, not per page: this is on every page's path.
        wanted = [
            (slot.request.vaddr, slot.request.vaddr + slot.request.nr_pages * PAGE_SIZE)
            for slot in self.slots
            if not slot.request.closes
            and slot.request.dst_id == dst_id
            and slot.request.vaddr < end
            and vaddr < slot.request.vaddr + slot.request.nr_pages * PAGE_SIZE
        ]
        cache = self.cache
        if not wanted:  # the common case: nobody else waits for these pages
            for key in keys:
                del cache[key]
        else:
            for key in keys:
                if not any(low <= key[1] < high for low, high in wanted):
                    del cache[key]
        return HEADER.pack(PS_IOV_ADD_F_PRESENT, count, vaddr, dst_id) + data

    def _answer_count(self, head: Slot) -> int:
        """How many pages of the oldest waiting request go to the daemon now (0: none yet).

        Replies go strictly in the order the daemon asked. It reads each into its oldest open
        request's buffer and applies it to that request's process only if the address matches one
        of that process's requests (criu/uffd.c, uffd_io_complete); a forked child shares its
        parent's image, so we cannot tell whose a request is. A reply out of order is dropped there
        without a word, and the process whose request it was waits for ever.

        But CRIU takes fewer pages than asked (it asks again for the rest). So a background request
        with a fault behind it gets what is here of it, from its first page on, and the fault goes
        next; if its first page is not here, that is hurried (_hurry). In a burst of
        faults a background request waits (fault_burst): answered whole, it only brings the daemon's
        next one, and the daemon copying 64 KiB and more of cold pages delays the next fault."""
        if head.asked.nr_pages == 1:
            return 1 if head.ready else 0
        first = (head.request.dst_id, head.request.vaddr)
        if any(slot.asked.nr_pages == 1 for slot in itertools.islice(self.slots, 1, None)):
            if first in self.cache:
                return self._cached_prefix(head.request)
            self._hurry(head.request)
            return 0
        if not head.ready:
            return 0
        if (wait := self._last_fault + self.fault_burst - time.monotonic()) > 0:
            if self._held_flush is None:
                self._held_flush = asyncio.get_running_loop().call_later(wait, self._flush_held)
            return 0
        return head.request.nr_pages

    def _cached_prefix(self, request: Request) -> int:
        """How many of its first pages are here, in a row."""
        count = 0
        while count < request.nr_pages and (request.dst_id, request.vaddr + count * PAGE_SIZE) in self.cache:
            count += 1
        return count

    def _hurry(self, request: Request) -> None:
        """A fault waits behind this request, whose first page is not here: ask for its first pages
        as a fault's, ahead of the larger fetch (of the source's lowest priority) that holds them."""
        key = (request.dst_id, request.vaddr)
        if key in self._hurried or self._agent is None:
            return
        window = self._clamp(request.dst_id, request.vaddr, MIN_WINDOW) or 1
        self._hurried.add(key)
        with contextlib.suppress(OSError):
            self._agent.write(HEADER.pack(request.cmd | URGENT, window, request.vaddr, request.dst_id))

    def _flush_held(self) -> None:
        self._held_flush = None
        task = asyncio.ensure_future(self._flush())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a dead daemon ends _requests

    async def _flush(self) -> None:
        """Answer the daemon as far as replies are ready, in the order it asked (_answer_count)."""
        assert self._daemon is not None
        while self.slots:
            head = self.slots[0]
            if head.request.closes:  # the last request, answered after every other one
                if head.reply is None:
                    break
                self.slots.popleft()
                self._daemon.write(head.reply)
                self.closed = True
                continue
            count = self._answer_count(head)
            if not count:
                break
            self.slots.popleft()
            request = head.request
            self._daemon.write(self._from_cache(request.dst_id, request.vaddr, count))
            self.pages += count
            self.delivered.add(request.dst_id, request.vaddr, count)
            if head.asked.nr_pages == 1:  # the daemon asks for one page per fault
                now = time.monotonic()
                self.fault_waits.append((head.asked_at - self._started, now - head.asked_at))
        await self._daemon.drain()

    def _kill_workload(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text())
            if pid > 0:  # 0 or less would signal a whole process group, the pager's own included
                os.kill(pid, signal.SIGKILL)  # init of the task's pid namespace

    def _write_result(self, *, ok: bool, error: str) -> None:
        waits = sorted(w for _, w in self.fault_waits)
        worst = sorted(self.fault_waits, key=lambda f: -f[1])[:5]
        faults = {
            "faults": len(waits),
            "fault_p50_ms": round(waits[len(waits) // 2] * 1000, 2) if waits else 0.0,
            "fault_max_ms": round(waits[-1] * 1000, 2) if waits else 0.0,
            "worst_faults": [[round(at, 3), round(w * 1000, 1)] for at, w in worst],
        }
        times = os.times()
        cpu = {"cpu_s": round(times.user + times.system, 3)}  # its share of each fault's cost
        result = {"ok": ok, "pages": self.pages, "error": error, "realtime": self.realtime, **faults, **cpu}
        atomic_write(self.result, json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferryman-pager")
    parser.add_argument("--ps-fd", type=int, required=True)
    parser.add_argument("--agent-socket", type=Path, required=True)
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--reconnect-timeout", type=float, default=30.0)
    parser.add_argument("--images", type=Path, required=True, help="the restore's images (lazy runs)")
    args = parser.parse_args(argv)
    ps = socket.socket(fileno=args.ps_fd)
    pager = Pager(ps, args.agent_socket, args.pid_file, args.result, args.reconnect_timeout, args.images)
    pager.realtime = run_realtime()
    keep_freed_memory()
    return asyncio.run(pager.run())


def run_realtime() -> bool:
    """Every fault of the workload waits on this process, which then runs for a few microseconds:
    it runs ahead of ordinary tasks (SCHED_FIFO at the lowest priority), so a busy host does not
    add a time slice to each fault. It blocks between messages; the kernel's RT throttling bounds
    it anyway. Where RT is not allowed (no CAP_SYS_NICE, an RT-less cgroup) it runs as before."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
