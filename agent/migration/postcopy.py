"""Post-copy page traffic: CRIU's page-server protocol carried over the migration stream.

Target: the pager (agent/migration/pager.py) connects to the agent's unix socket and writes the
lazy-pages daemon's requests; `TargetRelay` sends them to the source as `ps_req` and writes the
answers back. Source: `serve_pages` asks the dump's page server (on 127.0.0.1) and answers with
`ps_rep` plus the pages. A broken link loses nothing: the pager sends its unanswered requests again
on the next connection, and a page-server GET can be asked twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.checkpoint.images import PAGE_SIZE
from agent.checkpoint.pageserver import (
    FAULTING,
    HEADER,
    PS_IOV_ADD_F_PRESENT,
    PS_IOV_CLOSE,
    PUSHED,
    STATUS,
    PageServerClient,
    Request,
)
from agent.migration.link import ControlIn, Link, PagesIn, PeerFailed, page_key, split_key
from agent.migration.ranges import PageRanges

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


log = logging.getLogger(__name__)

_ZERO_PAGE = bytes(PAGE_SIZE)

HeldByTarget = Callable[[str, int, memoryview], list[bool]]
"""Source: (pagemap, vaddr, pages) -> which of them the target already holds from pre-copy."""
ReadLocal = Callable[[str, int, int], bytes | None]
"""Target: (pagemap, vaddr, count) -> those pages as pre-copy left them here, if it left them all."""


def pagemap_id(pagemap: str) -> int | None:
    """The inverse of pagemap_of: pagemap-<pid>.img -> pid."""
    stem = pagemap.removeprefix("pagemap-").removesuffix(".img")
    return int(stem) if stem.isdigit() and int(stem) > 0 else None


def pagemap_of(dst_id: int) -> str | None:
    """The pagemap image a post-copy request is about: for PS_IOV_GET, dst_id is the task's virtual pid
    itself (criu/page-xfer.c looks it up with pstree_item_by_virt), not an encoded image id."""
    return f"pagemap-{dst_id}.img" if dst_id > 0 else None


def ranges_of(flags: list[bool]) -> list[list[int]]:
    """[[first, count], ...] of the True runs."""
    out: list[list[int]] = []
    for i, flag in enumerate(flags):
        if flag:
            if out and out[-1][0] + out[-1][1] == i:
                out[-1][1] += 1
            else:
                out.append([i, 1])
    return out


@dataclass(frozen=True)
class PostcopyPaths:
    """Where a post-copy migration keeps its files on the target (all under the migration's work dir)."""

    work: Path

    @property
    def images(self) -> Path:
        return self.work / "images"

    @property
    def criu_work(self) -> Path:
        return self.work / "criu-work"

    @property
    def agent_socket(self) -> Path:
        return self.work / "pager.sock"

    @property
    def pid_file(self) -> Path:
        return self.work / "restored.pid"

    @property
    def result(self) -> Path:
        return self.work / "pager.json"


Process = subprocess.Popen[bytes]


def spawn_pager(paths: PostcopyPaths, reconnect_timeout: float) -> tuple[Process, socket.socket]:
    """Start the pager; returns it and the other end of its page socket, for the lazy-pages daemon.

    The pager starts early (it is a Python process: its start-up must not add to the downtime); the
    daemon can only start once the images are here.
    """
    daemon_end, pager_end = socket.socketpair()
    try:
        pager_end.set_inheritable(True)
        pager = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.migration.pager",
                "--ps-fd",
                str(pager_end.fileno()),
                "--agent-socket",
                str(paths.agent_socket),
                "--pid-file",
                str(paths.pid_file),
                "--result",
                str(paths.result),
                "--reconnect-timeout",
                str(reconnect_timeout),
                "--images",
                str(paths.images),
            ],
            pass_fds=(pager_end.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives an agent restart, like the daemon
        )
    except BaseException:
        daemon_end.close()
        raise
    finally:
        pager_end.close()
    return pager, daemon_end


class ControlRouter:
    """While page traffic owns a link's receive side, other control messages queue here."""

    def __init__(self) -> None:
        self.control: asyncio.Queue[ControlIn] = asyncio.Queue()

    async def expect(self, type_: str, traffic: asyncio.Task[None], link: Link) -> dict[str, Any]:
        """The next control message: queued by the traffic task, or read directly once it ended."""
        while True:
            if not self.control.empty():
                msg = self.control.get_nowait()
                if msg.type != type_:
                    raise PeerFailed(f"expected {type_!r} from the peer, got control {msg.type!r}")
                return msg.body
            if traffic.done():
                traffic.result()  # its error, if it failed
                return await link.expect(type_)
            getter = asyncio.ensure_future(self.control.get())
            await asyncio.wait({getter, traffic}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                self.control.put_nowait(getter.result())  # handled at the top, in order
            else:
                getter.cancel()
                await asyncio.gather(getter, return_exceptions=True)


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
        self.pushed: PageRanges | None = None
        """The pages pushed to the pager so far. None after an agent restart (nothing is parked then)."""
        self.held_here = PageRanges()
        """Hybrid: pages the push named as unchanged since pre-copy. They stay in the pre-copy store (not
        copied into the pager ahead of time) and this relay answers requests for them from it."""
        self._push_open = False
        """The source is pushing: background requests wait for the push instead of asking the source."""
        self._parked: list[Request] = []
        self._faulting_until = 0.0
        """The pager saw faults: until then the push is held (its acks wait) and nothing is parked."""
        self._acks_due = 0
        self._ack_due = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._pager: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.connected = asyncio.Event()
        """The pager has connected at least once: its start-up is behind it."""

    async def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.paths.agent_socket.unlink()
        self._server = await asyncio.start_unix_server(self._accept, path=str(self.paths.agent_socket), limit=1 << 16)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        self._acks_due = PUSH_WINDOW  # the first credits of this link's push (the source starts with none)
        self._ack_due.set()
        up = asyncio.create_task(self._requests(reader, writer, link), name="postcopy-requests")
        acks = asyncio.create_task(self._ack_pushes(link), name="postcopy-push-acks")
        try:
            await self._replies(link, writer, up)
            acks.cancel()
            await asyncio.gather(acks, return_exceptions=True)
            for _ in range(self._acks_due):  # the source's close waits for its acks: none kept back
                await link.send("push_ack")
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
            # store; a background request the push will bring waits for it (no second copy); anything
            # else, a page the push already brought included, is the source's to answer.
            if await self._answer_held(request, writer):
                continue
            if self._parks(request):
                self._parked.append(request)
                continue
            await link.send("ps_req", raw=raw.hex())

    async def _hold_push(self, link: Link) -> None:
        """The workload faults: the push waits (it would compete with the faults for CPU), and what
        waited for the push is the source's to answer now."""
        self._faulting_until = asyncio.get_running_loop().time() + PUSH_HOLD
        parked, self._parked = self._parked, []
        for request in parked:
            await link.send("ps_req", raw=request.raw.hex())

    def _faulting(self) -> bool:
        return asyncio.get_running_loop().time() < self._faulting_until

    async def _ack_pushes(self, link: Link) -> None:
        """Give the source its push credits back, but only while the workload is not faulting."""
        loop = asyncio.get_running_loop()
        while True:
            await self._ack_due.wait()
            if (wait := self._faulting_until - loop.time()) > 0:
                await asyncio.sleep(wait)  # and look again: the faults may have gone on
                continue
            self._ack_due.clear()
            while self._acks_due:
                self._acks_due -= 1
                await link.send("push_ack")

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
            if not isinstance(msg, ControlIn):
                raise PeerFailed("pages without a ps_rep header")
            if msg.type == "ps_closed":
                status = int(msg.body.get("status", -1)) & 0xFFFFFFFF
                writer.write(HEADER.pack(PS_IOV_CLOSE, status, 0, 0))  # the pager unwraps it
                await writer.drain()
                return
            if msg.type == "pushed":
                self._push_open = True
                await self._hand_push(link, msg, writer)
                continue
            if msg.type == "push_end":
                self._push_open = False
                parked, self._parked = self._parked, []
                for request in parked:  # not in the push (or it stopped short): the source answers
                    await link.send("ps_req", raw=request.raw.hex())
                continue
            if msg.type != "ps_rep":
                await self.control.put(msg)
                continue
            header = bytes.fromhex(str(msg.body["header"]))
            _, nr_pages, vaddr, dst_id = HEADER.unpack(header)
            local = self._local_pages(msg.body.get("local") or [], dst_id, vaddr, nr_pages)
            data = b""
            if nr_pages:
                batches: list[PagesIn] = []
                count = len(local)
                while count < nr_pages:  # the stream splits large replies into several frames
                    pages = await link.recv()
                    if not isinstance(pages, PagesIn):
                        raise PeerFailed("a ps_rep header without all its pages")
                    batches.append(pages)
                    count += len(pages.keys) + len(pages.zeros)
                data = assemble(batches, vaddr, nr_pages, local)
            writer.write(header + data)
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

    async def _hand_push(self, link: Link, msg: ControlIn, writer: asyncio.StreamWriter) -> None:
        """One pushed batch: the pages it carries go to the pager, unasked; the ones it names as held
        are noted (they stay in the pre-copy store). Parked requests it covers are answered now."""
        nr_pages, vaddr = int(msg.body["nr_pages"]), int(msg.body["vaddr"])
        dst_id = pagemap_id(str(msg.body["pagemap"]))
        held = [(int(first), int(n)) for first, n in msg.body.get("held") or []]
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
                data = assemble(batches, start, n)
                writer.write(HEADER.pack(PS_IOV_ADD_F_PRESENT | PUSHED, n, start, dst_id) + data)
                self.pushed.add(dst_id, start, n)
                self._on_pages(n)
            await writer.drain()
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
                continue  # its pages went to the pager, which answers it
            if not await self._answer_held(request, writer):
                waiting.append(request)
        self._parked = waiting

    def _local_pages(
        self, ranges: list[list[int]], dst_id: int, vaddr: int, nr_pages: int
    ) -> dict[int, bytes | memoryview]:
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
) -> bytes:
    """A reply's pages in address order: from its frames, the zero pages the stream elided and the
    pages this host already held."""
    if not local and len(batches) == 1 and not batches[0].zeros and len(batches[0].keys) == nr_pages:
        return bytes(batches[0].data)
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
            if not isinstance(msg, ControlIn):
                raise PeerFailed("pages from the target during post-copy")
            if msg.type == "push_ack":
                self.push_window.acked()
                continue
            if msg.type != "ps_req":
                await self.control.put(msg)
                continue
            request = Request.parse(bytes.fromhex(str(msg.body["raw"])))
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
                await link.send("ps_closed", status=STATUS.unpack(reply.data)[0])
            return True
        _, nr_pages, vaddr, dst_id = HEADER.unpack(reply.header)
        held = [False] * nr_pages
        pagemap = pagemap_of(dst_id)
        if self.held_by_target is not None and pagemap is not None and nr_pages:
            held = await asyncio.to_thread(self.held_by_target, pagemap, vaddr, memoryview(reply.data))
        local = ranges_of(held)
        send = [n for n in range(nr_pages) if not held[n]]
        async with self.sending:
            await link.send("ps_rep", header=reply.header.hex(), local=local)
            if send:
                keys = array("Q", (page_key(0, vaddr + n * PAGE_SIZE) for n in send))
                data = (
                    reply.data
                    if len(send) == nr_pages
                    else b"".join(reply.data[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] for n in send)
                )
                await link.send_raw_pages(keys, data)
        self.local_pages += nr_pages - len(send)
        self._on_pages(nr_pages)
        return False
