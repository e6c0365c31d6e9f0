"""Post-copy's background push: every lazy page goes to the target at stream speed, unasked.

CRIU's lazy-pages daemon fetches pages one request at a time, each a round trip through both agents
and the source's page server; a workload that writes its memory waits on every one. So once the
target runs, the source also reads the frozen processes' memory itself (/proc/PID/mem: frozen, so
it is exactly what the page server would serve) and streams all of it, in address order, 1 MiB per
batch. The target's pager keeps what arrives and answers the daemon's requests for those pages itself.

Hybrid: a page whose content the target already holds from pre-copy (same digest) is only named,
not sent again.

Wire: a `pushed` control {pagemap, vaddr, nr_pages, held: [[first, count], ...]} followed by the
pages that are not held, as page frames keyed like post-copy replies; `push_end` when done. Pushes
and replies never interleave (one send lock). The target's agent hands each pushed batch straight to
the pager, which answers the daemon from it without another hop. A link that breaks stops the push;
the relay then forwards every request again, so nothing waits on it.

Each page crosses once. The source notes every page it sends, in a reply or a push
(`SourcePages.sent`), and the push leaves out what a reply sent first: pages of the workload's faults
and their read-ahead. On the target, the agent holds the daemon's background requests until the push
brings their pages (faults still go to the source at once; `push_end` sends whatever is still held),
and asks the source only for the pages of a request that no push has handed the pager yet (relay.py);
the pager's read-ahead leaves out pages the daemon has. Before this a lazy migration of 1 GiB at
50 MB/s sent 13% more than its memory (every page a fault fetched was pushed again); now 0.2%.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.checkpoint.images import PAGE_SIZE, read_pagemaps
from agent.checkpoint.livepages import LiveProcess
from agent.migration.link import Link, page_key
from agent.migration.postcopy import HeldByTarget, pagemap_id, ranges_of
from agent.migration.protocol import Pushed, PushEnd
from agent.migration.pushflow import PushWindow
from agent.migration.ranges import PageRanges

log = logging.getLogger(__name__)

PUSH_PAGES = 256  # 1 MiB per pushed batch: the stream's chunk
_QUEUE = 8  # batches read ahead of the stream


@dataclass(frozen=True)
class PushBatch:
    pagemap: str
    vaddr: int
    nr_pages: int
    held: list[bool]
    data: bytes


@dataclass
class PushCounts:
    pages: int = 0
    """Pages pushed or named as held."""
    held: int = 0
    """Of those, named only: the target held them from pre-copy."""
    skipped: int = 0
    """Pages left out because a reply had sent them already (the workload faulted on them first)."""
    wait_read: float = 0.0
    """Seconds the push waited for /proc/PID/mem reads (the producer thread)."""
    wait_credit: float = 0.0
    """Seconds it waited for credits (the target's push_ack)."""
    wait_send: float = 0.0
    """Seconds it spent handing frames to the stream (its own credits, the send lock)."""


@dataclass(frozen=True)
class Region:
    """One process's lazy pages: (vaddr, nr_pages) runs from the final dump's pagemap."""

    host_pid: int
    pagemap: str
    runs: list[tuple[int, int]]


def lazy_regions(image_dir: Path, processes: list[LiveProcess]) -> list[Region]:
    """The lazy runs of each dumped process, matched to its host pid by pagemap name."""
    by_name = {p.pagemap: p.host_pid for p in processes}
    out = []
    for pm in read_pagemaps(image_dir):
        pid = by_name.get(pm.name)
        runs = [(r.vaddr, r.nr_pages) for r in pm.lazy_ranges]
        if pid is not None and runs:
            out.append(Region(pid, pm.name, runs))
    return out


def next_unsent(sent: PageRanges, dst_id: int, vaddr: int, nr_pages: int, at: int) -> tuple[int, int] | None:
    """The first run of a batch's pages, from its page `at` on, that has not crossed yet: (first, count)
    counted from the batch's first page; None when every one has."""
    start = vaddr + at * PAGE_SIZE
    for first, count in sent.missing(dst_id, start, nr_pages - at):
        return at + first, count
    return None


def read_batches(regions: list[Region], held_by_target: HeldByTarget | None) -> Iterator[PushBatch]:
    """Batches of the frozen processes' lazy pages in address order (call from a worker thread: it
    reads and hashes). Address order is also the order of the daemon's own background requests, so
    the one it has open is normally already pushed."""
    for region in regions:
        try:
            fd = os.open(f"/proc/{region.host_pid}/mem", os.O_RDONLY)
        except OSError as exc:
            log.warning("cannot push pages", extra={"pid": region.host_pid, "error": str(exc)})
            continue  # its requests still get every page
        try:
            for vaddr, count in region.runs:
                for first in range(0, count, PUSH_PAGES):
                    n = min(PUSH_PAGES, count - first)
                    address = vaddr + first * PAGE_SIZE
                    data = os.pread(fd, n * PAGE_SIZE, address)
                    if len(data) != n * PAGE_SIZE:
                        continue  # should not happen to a frozen process; its requests still get it
                    held = held_by_target(region.pagemap, address, memoryview(data)) if held_by_target else [False] * n
                    yield PushBatch(region.pagemap, address, n, held, data)
        finally:
            os.close(fd)


async def push(
    link: Link,
    sending: asyncio.Lock,
    regions: list[Region],
    held_by_target: HeldByTarget | None,
    on_pages: Callable[[int], None],
    stop: asyncio.Event,
    window: PushWindow,
    counts: PushCounts,
    sent: PageRanges | None = None,
    carried: PageRanges | None = None,
) -> None:
    """Stream every lazy page of `regions` to the target until done or `stop` is set (checked between
    batches, so a header never goes without its pages). A batch with pages goes only with a credit
    of `window`, which the target's `push_ack` returns: a fault's reply then never queues behind more
    than a couple of pushed MiB. `counts` follows along. Pages in `sent` (shared with the replies,
    changed only under `sending`) are left out, and what is pushed is added to it: each page crosses
    once. The pages it carries as data (not named as held) also go into `carried`."""
    sent = PageRanges() if sent is None else sent
    carried = PageRanges() if carried is None else carried
    loop = asyncio.get_running_loop()
    # The reader thread hands batches over without waiting for the loop (a wake-up of the loop per
    # batch, not a round trip): only `room` bounds it.
    queue: asyncio.Queue[PushBatch | None] = asyncio.Queue()
    room = threading.Semaphore(_QUEUE)
    done = False

    def produce() -> None:
        try:
            for batch in read_batches(regions, held_by_target):
                while not room.acquire(timeout=0.1):
                    if done:
                        return
                if done:
                    return
                loop.call_soon_threadsafe(queue.put_nowait, batch)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    producer = asyncio.ensure_future(asyncio.to_thread(produce))
    try:
        while not stop.is_set():
            t0 = loop.time()
            batch = await queue.get()
            room.release()
            counts.wait_read += loop.time() - t0
            if batch is None:
                break
            dst_id = pagemap_id(batch.pagemap) or 0
            at = 0  # the batch's pages before this are dealt with
            while at < batch.nr_pages:
                credit = not all(batch.held[at:])  # pages may follow: the target acks those
                if credit:
                    t0 = loop.time()
                    await window.take()
                    counts.wait_credit += loop.time() - t0
                t0 = loop.time()
                async with sending:
                    # Looked up under the lock: a reply sends nothing meanwhile.
                    run = None if stop.is_set() else next_unsent(sent, dst_id, batch.vaddr, batch.nr_pages, at)
                    if run is None:
                        if credit:
                            window.give_back()
                        counts.skipped += 0 if stop.is_set() else batch.nr_pages - at
                        break
                    first, n = run
                    held = batch.held[first : first + n]
                    send = [first + k for k in range(n) if not held[k]]
                    if send:
                        window.sent()  # before the header: the ack may come back before the pages are queued
                    elif credit:
                        window.give_back()
                    vaddr = batch.vaddr + first * PAGE_SIZE
                    sent.add(dst_id, vaddr, n)
                    await link.send(Pushed(pagemap=batch.pagemap, vaddr=vaddr, nr_pages=n, held=ranges_of(held)))
                    for k, count in ranges_of([not h for h in held]):
                        carried.add(dst_id, vaddr + k * PAGE_SIZE, count)
                    if send:
                        keys = array("Q", (page_key(0, batch.vaddr + k * PAGE_SIZE) for k in send))
                        data = (
                            batch.data
                            if len(send) == batch.nr_pages
                            else b"".join(batch.data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] for k in send)
                        )
                        await link.send_raw_pages(keys, data)
                counts.wait_send += loop.time() - t0
                counts.skipped += first - at
                counts.pages += n
                counts.held += n - len(send)
                on_pages(n)
                at = first + n
        async with sending:
            if not stop.is_set():  # never after the close's answer
                await link.send(PushEnd(pages=counts.pages))
    finally:
        done = True
        room.release()  # a reader waiting for room sees `done`
        await asyncio.gather(producer, return_exceptions=True)
