"""Source: one page-server session of a post-copy migration, answered over the migration stream.

`SourcePages` reads the target's `ps_req` messages, asks the dump's page server (CRIU, on 127.0.0.1)
and answers with `ps_rep` plus the pages the target does not already hold. Faults go first; the
daemon's close goes last. It also owns what the background push shares with the replies: the send
lock, the stop flag and the push window.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Awaitable, Callable

from agent.checkpoint.images import PAGE_SIZE
from agent.checkpoint.pageserver import HEADER, STATUS, PageServerClient, Request
from agent.migration.link import Link, PeerFailed, page_key
from agent.migration.postcopy import ControlRouter, HeldByTarget, pagemap_of, ranges_of
from agent.migration.protocol import Message, PsClosed, PsRep, PsReq, PushAck
from agent.migration.pushflow import PushWindow
from agent.migration.ranges import PageRanges


class SourcePages(ControlRouter):
    """Source: answers page requests while the driver waits for the target's control messages."""

    def __init__(
        self,
        client: PageServerClient,
        on_pages: Callable[[int], None],
        before_reply: Callable[[], Awaitable[None]] | None = None,
        held_by_target: HeldByTarget | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self._on_pages = on_pages
        self._before_reply = before_reply
        self.held_by_target = held_by_target
        """Set for hybrid migrations; cleared when a reconnecting target says it lost its store."""
        self.local_pages = 0
        self.sending = asyncio.Lock()
        """Held while one reply (or push) is on its way: a header and its page frames stay together."""
        self.push_stop = asyncio.Event()
        """Set before the close is answered: no pushed page may follow `ps_closed`."""
        self.push_window = PushWindow()
        """Pushed batches the target has not stored yet; its `push_ack` gives a credit back."""
        self.sent = PageRanges()
        """Pages given to the target so far, by task (dst_id): in a reply, in a push, or named as held.
        Changed only under `sending`. The push leaves these out, so a page a fault brought early does not
        cross again. A reply carries what it is asked (the pager may have dropped a page the daemon had),
        but for a FRESH request the pages in `carried`."""
        self.carried = PageRanges()
        """Pages a push carried (as data) over `push_link`. A FRESH request (none of its pages reached the
        target's daemon) is answered without them: they are ahead of the answer on the same link."""
        self.push_link: Link | None = None
        """The link the push runs over; after a reconnect nothing is left out (the old link may have lost it)."""
        self.served = 0
        """Pages sent in replies (on demand), the ones named as held not included."""
        self.resent = 0
        """Of the pages sent in replies, those that had crossed before: the waste the counters show."""

    async def serve(self, link: Link) -> None:
        """Answer this link's requests until the daemon's close has been answered.

        Requests queue by size: a fault (a few pages) is answered before read-ahead and background
        slices that arrived earlier. The pager matches answers by address, so the order is ours.
        """
        queue: asyncio.PriorityQueue[tuple[int, int, Request]] = asyncio.PriorityQueue()
        reader = asyncio.create_task(self._read_requests(link, queue), name="postcopy-read")
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    await asyncio.gather(getter, return_exceptions=True)
                    reader.result()  # the link's error
                    raise PeerFailed("the post-copy link ended")
                _, _, request = getter.result()
                if await self._answer(link, request):
                    # The target acknowledged every push it stored before our close: take those acks
                    # here, so none is left for whoever reads the link next.
                    drained = asyncio.ensure_future(self.push_window.drained())
                    await asyncio.wait(
                        {drained, reader}, timeout=link.idle_timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                    if not drained.done():
                        drained.cancel()
                        raise PeerFailed("the target did not acknowledge every pushed batch")
                    return
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_requests(self, link: Link, queue: asyncio.PriorityQueue[tuple[int, int, Request]]) -> None:
        seq = 0
        while True:
            msg = await link.recv()
            if not isinstance(msg, Message):
                raise PeerFailed("pages from the target during post-copy")
            if isinstance(msg, PushAck):
                self.push_window.acked()
                continue
            if not isinstance(msg, PsReq):
                await self.control.put(msg)
                continue
            request = Request.parse(msg.raw)
            seq += 1
            # A close goes last: it may only be answered once everything asked before it was.
            priority = 1 << 62 if request.closes else 0 if request.urgent else request.nr_pages
            await queue.put((priority, seq, request))

    async def _answer(self, link: Link, request: Request) -> bool:
        """One request; True once it was the daemon's close."""
        if self._before_reply is not None:
            await self._before_reply()
        reply = await self.client.ask(request)
        if request.closes:
            self.push_stop.set()
            async with self.sending:  # a push batch under way goes out whole first
                await link.send(PsClosed(status=STATUS.unpack(reply.data)[0]))
            return True
        _, nr_pages, vaddr, dst_id = HEADER.unpack(reply.header)
        held = [False] * nr_pages
        pagemap = pagemap_of(dst_id)
        if self.held_by_target is not None and pagemap is not None and nr_pages:
            held = await asyncio.to_thread(self.held_by_target, pagemap, vaddr, memoryview(reply.data))
        local = ranges_of(held)
        async with self.sending:
            carried = [False] * nr_pages
            if request.fresh and link is self.push_link and nr_pages:
                carried = covered(self.carried, dst_id, vaddr, nr_pages)
            skip = [held[n] or carried[n] for n in range(nr_pages)]
            send = [n for n in range(nr_pages) if not skip[n]]
            if send:
                self.resent += sent_again(self.sent, dst_id, vaddr, skip)
            self.sent.add(dst_id, vaddr, nr_pages)
            await link.send(PsRep(header=reply.header, local=local, pushed=ranges_of(carried)))
            if send:
                keys = array("Q", (page_key(0, vaddr + n * PAGE_SIZE) for n in send))
                data = (
                    reply.data
                    if len(send) == nr_pages
                    else b"".join(reply.data[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] for n in send)
                )
                await link.send_raw_pages(keys, data)
        self.local_pages += sum(held)
        self.served += len(send)
        self._on_pages(nr_pages)
        return False


def covered(ranges: PageRanges, dst_id: int, vaddr: int, nr_pages: int) -> list[bool]:
    """Which of the `nr_pages` pages from `vaddr` are in `ranges`."""
    flags = [True] * nr_pages
    for first, count in ranges.missing(dst_id, vaddr, nr_pages):
        flags[first : first + count] = [False] * count
    return flags


def sent_again(sent: PageRanges, dst_id: int, vaddr: int, held: list[bool]) -> int:
    """How many of a reply's pages (those from `vaddr` not `held` by the target) crossed before."""
    fresh = [False] * len(held)
    for first, count in sent.missing(dst_id, vaddr, len(held)):
        fresh[first : first + count] = [True] * count
    return sum(1 for n in range(len(held)) if not held[n] and not fresh[n])
