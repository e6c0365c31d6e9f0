"""Target: the agent's side of the pager socket, relaying the lazy-pages daemon's requests to the source.

The pager writes the daemon's requests to the agent's unix socket; `TargetRelay` answers the ones it
can from here (pages pre-copy left and the push named unchanged), leaves out of a fresh request the
pages a push has handed the pager already, parks background requests the push is about to bring, and
sends the rest to the source as `ps_req`. Replies and pushed batches go back to the pager. It also
paces the source's push: its credits wait while the workload faults.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from agent.checkpoint.images import PAGE_SIZE
from agent.checkpoint.pageserver import FAULTING, HEADER, PS_IOV_ADD_F_PRESENT, PS_IOV_CLOSE, PUSHED, Request
from agent.migration.link import Link, PagesIn, PeerFailed, split_key
from agent.migration.pagerproc import PostcopyPaths, widen_send_buffer
from agent.migration.postcopy import ControlRouter, ReadLocal, pagemap_id, pagemap_of, ranges_of
from agent.migration.protocol import Message, PsClosed, PsRep, PsReq, PushAck, Pushed, PushEnd, Ranges
from agent.migration.pushflow import PUSH_HOLD, PUSH_WINDOW
from agent.migration.ranges import PageRanges

_ZERO_PAGE = bytes(PAGE_SIZE)


class TargetRelay(ControlRouter):
    """The agent's side of the pager socket: requests to the source, replies back."""

    def __init__(
        self, paths: PostcopyPaths, on_pages: Callable[[int], None], read_local: ReadLocal | None = None
    ) -> None:
        super().__init__()
        self.paths = paths
        self._on_pages = on_pages
        self.read_local = read_local
        """Pages pre-copy left here; None after an agent restart (the store's index died with it)."""
        self.push_hold = PUSH_HOLD
        """Seconds after a fault during which push credits wait (pushflow.PUSH_HOLD; tests widen it)."""
        self.pushed: PageRanges | None = None
        """The pages pushed to the pager so far. None after an agent restart (nothing is parked then)."""
        self.held_here = PageRanges()
        """Hybrid: pages the push named as unchanged since pre-copy. They stay in the pre-copy store (not
        copied into the pager ahead of time) and this relay answers requests for them from it."""
        self._push_open = False
        """The source is pushing: background requests wait for the push instead of asking the source."""
        self._parked: list[Request] = []
        self._as_pushed: set[tuple[int, int]] = set()
        """(dst_id, vaddr) of the parts of requests _not_pushed cut: their answers go to the pager as pushed."""
        self._faulting_until = 0.0
        """The pager saw faults: until then the push is held (its acks wait) and nothing is parked."""
        self._acks_due = 0
        self._ack_due = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._pager: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.connected = asyncio.Event()
        """The pager has connected at least once: its start-up is behind it."""
        self.drain_wait = 0.0
        """Seconds pushed batches waited for the pager to read them (its socket full)."""
        self.ack_hold = 0.0
        """Seconds push credits were held back while the workload faulted."""

    async def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.paths.agent_socket.unlink()
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.paths.agent_socket), limit=1 << 16)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (sock := writer.get_extra_info("socket")) is not None:
            widen_send_buffer(sock)
        await self._pager.put((reader, writer))
        self.connected.set()

    async def relay(self, link: Link, within: float) -> None:
        """Carry traffic until the daemon's close is answered. On any error the pager connection is
        dropped too, so the pager sends its unanswered requests again over the next link."""
        async with asyncio.timeout(within):
            reader, writer = await self._pager.get()
        while not self._pager.empty():  # a newer connection replaces an older one
            writer.close()
            reader, writer = self._pager.get_nowait()
        if self.pushed is not None:  # what a lost connection carried may never have reached the pager
            self.pushed = PageRanges()
        self._as_pushed.clear()
        self._acks_due = PUSH_WINDOW  # the first credits of this link's push (the source starts with none)
        self._ack_due.set()
        up = asyncio.create_task(self._requests(reader, writer, link), name="postcopy-requests")
        acks = asyncio.create_task(self._ack_pushes(link), name="postcopy-push-acks")
        try:
            await self._replies(link, writer, up)
            acks.cancel()
            await asyncio.gather(acks, return_exceptions=True)
            for _ in range(self._acks_due):  # the source's close waits for its acks: none kept back
                await link.send(PushAck())
        finally:
            self._acks_due = 0
            for task in (up, acks):
                task.cancel()
            await asyncio.gather(up, acks, return_exceptions=True)
            writer.close()  # the pager asks again for whatever is unanswered, parked requests too
            self._push_open = False
            self._parked.clear()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
        while True:
            raw = await reader.readexactly(HEADER.size)
            if HEADER.unpack(raw)[0] == FAULTING:
                await self._hold_push(link)
                continue
            request = Request.parse(raw)  # never forward garbage to the source's CRIU
            # Not the pager's yet. Pages pre-copy left here and the push named unchanged come from the
            # store; pages a push already handed to the pager (unread there yet) are not asked again;
            # a background request the push will bring waits for it (no second copy); the rest is the
            # source's to answer.
            if await self._answer_held(request, writer):
                continue
            for part in self._not_pushed(request):
                if self._parks(part):
                    self._parked.append(part)
                else:
                    await link.send(PsReq(raw=part.raw))

    def _not_pushed(self, request: Request) -> list[Request]:
        """What of a request is left to ask for. A fresh one (none of its pages reached the daemon)
        loses the pages a push handed to the pager already: they wait, unread, in the pager's socket,
        and the pager answers from them. The parts of a request cut that way come back to the pager
        as pushed pages (it takes pushed pages for any request they complete), not as an answer."""
        if not request.fresh or request.closes or self.pushed is None:
            return [request]
        runs = self.pushed.missing(request.dst_id, request.vaddr, request.nr_pages)
        if runs == [(0, request.nr_pages)]:
            return [request]
        parts = [request.part(first, count) for first, count in runs]
        self._as_pushed.update((part.dst_id, part.vaddr) for part in parts)
        return parts

    async def _hold_push(self, link: Link) -> None:
        """The workload faults: the push waits (it would compete with the faults for CPU), and what
        waited for the push is the source's to answer now."""
        self._faulting_until = asyncio.get_running_loop().time() + self.push_hold
        parked, self._parked = self._parked, []
        for request in parked:
            await link.send(PsReq(raw=request.raw))

    def _faulting(self) -> bool:
        return asyncio.get_running_loop().time() < self._faulting_until

    async def _ack_pushes(self, link: Link) -> None:
        """Give the source its push credits back, but only while the workload is not faulting."""
        loop = asyncio.get_running_loop()
        while True:
            await self._ack_due.wait()
            if (wait := self._faulting_until - loop.time()) > 0:
                self.ack_hold += wait
                await asyncio.sleep(wait)  # and look again: the faults may have gone on
                continue
            self._ack_due.clear()
            while self._acks_due:
                self._acks_due -= 1
                await link.send(PushAck())

    async def _answer_held(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        pagemap = pagemap_of(request.dst_id)
        if self.read_local is None or pagemap is None or request.closes:
            return False
        if not self.held_here.covers(request.dst_id, request.vaddr, request.nr_pages):
            return False
        if request.nr_pages > 64:  # a large read off the loop
            data = await asyncio.to_thread(self.read_local, pagemap, request.vaddr, request.nr_pages)
        else:
            data = self.read_local(pagemap, request.vaddr, request.nr_pages)
        if data is None:
            return False
        writer.write(HEADER.pack(PS_IOV_ADD_F_PRESENT, request.nr_pages, request.vaddr, request.dst_id) + data)
        await writer.drain()
        self._on_pages(request.nr_pages)
        return True

    async def _replies(self, link: Link, writer: asyncio.StreamWriter, up: asyncio.Task[None]) -> None:
        while True:
            recv = asyncio.ensure_future(link.recv())
            await asyncio.wait({recv, up}, return_when=asyncio.FIRST_COMPLETED)
            if not recv.done():  # the pager went away (or sent garbage)
                recv.cancel()
                await asyncio.gather(recv, return_exceptions=True)
                with contextlib.suppress(asyncio.IncompleteReadError):  # it ended: the target asks why
                    up.result()
                raise PeerFailed("the pager closed its connection")
            msg = recv.result()
            if not isinstance(msg, Message):
                raise PeerFailed("pages without a ps_rep header")
            if isinstance(msg, PsClosed):
                status = msg.status & 0xFFFFFFFF
                writer.write(HEADER.pack(PS_IOV_CLOSE, status, 0, 0))  # the pager unwraps it
                await writer.drain()
                return
            if isinstance(msg, Pushed):
                self._push_open = True
                await self._hand_push(link, msg, writer)
                continue
            if isinstance(msg, PushEnd):
                self._push_open = False
                parked, self._parked = self._parked, []
                for request in parked:  # not in the push (or it stopped short): the source answers
                    await link.send(PsReq(raw=request.raw))
                continue
            if not isinstance(msg, PsRep):
                await self.control.put(msg)
                continue
            header = msg.header
            _, nr_pages, vaddr, dst_id = HEADER.unpack(header)
            local = self._local_pages(msg.local, dst_id, vaddr, nr_pages)
            batches: list[PagesIn] = []
            count = len(local) + sum(n for _, n in msg.pushed)
            while count < nr_pages:  # the stream splits large replies into several frames
                pages = await link.recv()
                if not isinstance(pages, PagesIn):
                    raise PeerFailed("a ps_rep header without all its pages")
                batches.append(pages)
                count += len(pages.keys) + len(pages.zeros)
            if msg.pushed or (dst_id, vaddr) in self._as_pushed:
                # Not an answer the pager waits for as such: the pages a push carried are in its socket
                # already, and these complete its request (or they are a part of one, _not_pushed).
                self._as_pushed.discard((dst_id, vaddr))
                came = [True] * nr_pages
                for first, n in msg.pushed:
                    came[first : first + n] = [False] * n
                for first, n in ranges_of(came):
                    start = vaddr + first * PAGE_SIZE
                    data = assemble(batches, start, n, local)
                    writer.write(HEADER.pack(PS_IOV_ADD_F_PRESENT | PUSHED, n, start, dst_id) + data)
                    if self.pushed is not None:
                        self.pushed.add(dst_id, start, n)
            else:
                writer.write(header + (assemble(batches, vaddr, nr_pages, local) if nr_pages else b""))
            await writer.drain()
            self._on_pages(nr_pages)

    def _parks(self, request: Request) -> bool:
        return (
            self._push_open
            and not self._faulting()
            and self.pushed is not None
            and not request.closes
            and not request.urgent
            and not self.pushed.covers(request.dst_id, request.vaddr, request.nr_pages)
        )  # held_here is checked first: a held page is never parked

    async def _hand_push(self, link: Link, msg: Pushed, writer: asyncio.StreamWriter) -> None:
        """One pushed batch: the pages it carries go to the pager, unasked; the ones it names as held
        are noted (they stay in the pre-copy store). Parked requests it covers are answered now."""
        nr_pages, vaddr = msg.nr_pages, msg.vaddr
        dst_id = pagemap_id(msg.pagemap)
        held = msg.held
        batches: list[PagesIn] = []
        count = sum(n for _, n in held)
        while count < nr_pages:
            pages = await link.recv()
            if not isinstance(pages, PagesIn):
                raise PeerFailed("a pushed header without all its pages")
            batches.append(pages)
            count += len(pages.keys) + len(pages.zeros)
        if self.pushed is not None and dst_id is not None:  # after a restart: the daemon asks the source
            carried = [True] * nr_pages
            for first, n in held:
                self.held_here.add(dst_id, vaddr + first * PAGE_SIZE, n)
                carried[first : first + n] = [False] * n
            for first, n in ranges_of(carried):
                start = vaddr + first * PAGE_SIZE
                writer.write(HEADER.pack(PS_IOV_ADD_F_PRESENT | PUSHED, n, start, dst_id))
                writer.write(assemble(batches, start, n))  # in one piece: no copy of the common case
                self.pushed.add(dst_id, start, n)
                self._on_pages(n)
            t0 = asyncio.get_running_loop().time()
            await writer.drain()
            self.drain_wait += asyncio.get_running_loop().time() - t0
            await self._settle_parked(writer)
        if batches:  # it carried pages: the source waits for this credit
            self._acks_due += 1
            self._ack_due.set()

    async def _settle_parked(self, writer: asyncio.StreamWriter) -> None:
        """Parked requests the push has brought: the pager's now, or this relay's from the store."""
        assert self.pushed is not None
        waiting: list[Request] = []
        for request in self._parked:
            if self.pushed.covers(request.dst_id, request.vaddr, request.nr_pages):
                self._as_pushed.discard((request.dst_id, request.vaddr))
                continue  # its pages went to the pager, which answers it
            if not await self._answer_held(request, writer):
                waiting.append(request)
        self._parked = waiting

    def _local_pages(self, ranges: Ranges, dst_id: int, vaddr: int, nr_pages: int) -> dict[int, bytes | memoryview]:
        """The pages the source said we hold, read from the pre-copy store a run at a time (by address)."""
        pagemap = pagemap_of(dst_id)
        out: dict[int, bytes | memoryview] = {}
        for first, count in ranges:
            start = vaddr + first * PAGE_SIZE
            run = None
            if self.read_local is not None and pagemap is not None and first >= 0 and first + count <= nr_pages:
                run = self.read_local(pagemap, start, count)
            if run is None:
                raise PeerFailed(f"the source counts on a local copy of pages at {start:#x} that is not here")
            view = memoryview(run)
            for n in range(count):
                out[start + n * PAGE_SIZE] = view[n * PAGE_SIZE : (n + 1) * PAGE_SIZE]
        return out

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.paths.agent_socket.unlink()


def assemble(
    batches: list[PagesIn], vaddr: int, nr_pages: int, local: dict[int, bytes | memoryview] | None = None
) -> bytes | memoryview:
    """A reply's pages in address order: from its frames, the zero pages the stream elided and the
    pages this host already held. One frame of exactly those pages is returned as it is (a view)."""
    one = batches[0] if len(batches) == 1 else None
    if (
        not local
        and one is not None
        and not one.zeros
        and 0 < len(one.keys) == nr_pages
        and split_key(one.keys[0])[1] == vaddr
    ):
        return one.data
    pages: dict[int, bytes | memoryview] = dict(local or {})
    for batch in batches:
        for index, key in enumerate(batch.keys):
            pages[split_key(key)[1]] = batch.data[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
        for key in batch.zeros:
            pages[split_key(key)[1]] = _ZERO_PAGE
    out: list[bytes | memoryview] = []
    for n in range(nr_pages):
        page = pages.get(vaddr + n * PAGE_SIZE)
        if page is None:
            raise PeerFailed(f"page {vaddr + n * PAGE_SIZE:#x} missing from a post-copy reply")
        out.append(page)
    return b"".join(out)
