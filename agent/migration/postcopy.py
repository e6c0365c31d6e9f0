"""Post-copy page traffic: CRIU's page-server protocol carried over the migration stream.

Target: the pager (agent/migration/pager.py) connects to the agent's unix socket and writes the
lazy-pages daemon's requests; `TargetRelay` (relay.py) sends them to the source as `ps_req` and
writes the answers back. Source: `SourcePages` (pageserve.py) asks the dump's page server (on
127.0.0.1) and answers with `ps_rep` plus the pages. A broken link loses nothing: the pager sends its
unanswered requests again on the next connection, and a page-server GET can be asked twice.

The other post-copy modules: pagerproc.py (the pager process and its files), pagepush.py (the
source's background push) and pushflow.py (the push's flow control). This one holds what both ends
share: how requests name pagemaps, page runs on the wire, and the queue for control messages that
arrive while page traffic owns a link.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from agent.migration.link import Link
from agent.migration.protocol import Message, ProtocolError, Ranges

M = TypeVar("M", bound=Message)

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


def ranges_of(flags: list[bool]) -> Ranges:
    """((first, count), ...) of the True runs."""
    out: list[list[int]] = []
    for i, flag in enumerate(flags):
        if flag:
            if out and out[-1][0] + out[-1][1] == i:
                out[-1][1] += 1
            else:
                out.append([i, 1])
    return tuple((first, count) for first, count in out)


class ControlRouter:
    """While page traffic owns a link's receive side, other control messages queue here."""

    def __init__(self) -> None:
        self.control: asyncio.Queue[Message] = asyncio.Queue()

    async def expect(self, kind: type[M], traffic: asyncio.Task[None], link: Link) -> M:
        """The next control message: queued by the traffic task, or read directly once it ended."""
        while True:
            if not self.control.empty():
                msg = self.control.get_nowait()
                if not isinstance(msg, kind):
                    raise ProtocolError(repr(kind.tag), repr(msg.tag))
                return msg
            if traffic.done():
                traffic.result()  # its error, if it failed
                return await link.expect(kind)
            getter = asyncio.ensure_future(self.control.get())
            await asyncio.wait({getter, traffic}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                self.control.put_nowait(getter.result())  # handled at the top, in order
            else:
                getter.cancel()
                await asyncio.gather(getter, return_exceptions=True)
