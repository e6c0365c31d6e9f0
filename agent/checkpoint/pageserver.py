"""CRIU's page-server protocol, as far as post-copy uses it (criu/page-xfer.c).

The lazy-pages daemon on the target asks `PS_IOV_GET(nr_pages, vaddr, dst_id)`; the dump's page
server answers with a header of the same shape and the page data, in request order. `PS_IOV_CLOSE`
ends the session and is answered with a 4-byte status. ferryman never lets the two CRIUs talk
directly: each agent speaks this protocol to its local CRIU and carries it over the migration stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Any

from agent.checkpoint.images import PAGE_SIZE
from core.errors import FerrymanError

HEADER = struct.Struct("<I4xQQQ")  # u32 cmd, (padding), u64 nr_pages, u64 vaddr, u64 dst_id
STATUS = struct.Struct("<i")
PS_IOV_GET = 7
PS_IOV_ADD_F_PRESENT = 6 | (1 << 2) << 16  # the page server's answer: PS_IOV_ADD_F with PE_PRESENT
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
_CMD_MASK = 0xFFFF
URGENT = 1 << 31  # ferryman's own mark on a GET for a fault (never reaches CRIU): answer it first
PUSHED = 1 << 30  # ferryman's own mark on an answer nobody asked for (agent -> pager): pushed pages
FAULTING = 1 << 29  # ferryman's own notice (pager -> agent), no pages: the workload is faulting now
FRESH = 1 << 28  # ferryman's own mark on a GET (pager -> agent): none of its pages reached the daemon yet,
# so whatever of it a push has already brought need not come again (relay.py)
MAX_REQUEST_PAGES = (64 << 20) // PAGE_SIZE  # CRIU asks for at most 4 MiB; refuse absurd requests


class PageServerError(FerrymanError):
    code = "page_server_error"
    http_status = 502


@dataclass(frozen=True)
class Request:
    cmd: int
    nr_pages: int
    vaddr: int
    dst_id: int
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Request:
        if len(raw) != HEADER.size:
            raise PageServerError(f"page-server request of {len(raw)} bytes, expected {HEADER.size}")
        cmd, nr_pages, vaddr, dst_id = HEADER.unpack(raw)
        request = cls(cmd & _CMD_MASK, nr_pages, vaddr, dst_id, bytes(raw))
        if request.cmd == PS_IOV_GET and not 0 < nr_pages <= MAX_REQUEST_PAGES:
            raise PageServerError(f"page-server request for {nr_pages} pages")
        if request.cmd not in (PS_IOV_GET, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
            raise PageServerError(f"page-server command {cmd:#x} is not part of post-copy")
        return request

    @property
    def closes(self) -> bool:
        return self.cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE)

    @property
    def urgent(self) -> bool:
        return bool(HEADER.unpack(self.raw)[0] & URGENT)

    @property
    def fresh(self) -> bool:
        return bool(HEADER.unpack(self.raw)[0] & FRESH)

    def marked(self, mark: int) -> Request:
        """The same request with one more of ferryman's marks."""
        return Request.parse(HEADER.pack(HEADER.unpack(self.raw)[0] | mark, self.nr_pages, self.vaddr, self.dst_id))

    def part(self, first: int, count: int) -> Request:
        """`count` of its pages from its page `first` on, with the same marks."""
        flags = HEADER.unpack(self.raw)[0]
        return Request.parse(HEADER.pack(flags, count, self.vaddr + first * PAGE_SIZE, self.dst_id))

    def for_criu(self) -> bytes:
        """The request as CRIU must see it: without ferryman's marks."""
        return HEADER.pack(self.cmd, self.nr_pages, self.vaddr, self.dst_id)


@dataclass(frozen=True)
class Reply:
    """The answer to one request: a header plus pages, or (for a close) a status."""

    header: bytes
    data: bytes

    @property
    def nr_pages(self) -> int:
        return HEADER.unpack(self.header)[1] if len(self.header) == HEADER.size else 0


class PageServerClient:
    """The source side: one session with the dump's page server on 127.0.0.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, port: int, dump: asyncio.Future[Any], within: float) -> PageServerClient:
        """Connect once the dump listens; fail early if the dump itself ended first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if dump.done():
                dump.result()  # the dump's own error, if it has one
                raise PageServerError("the dump ended before its page server accepted a connection")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
                return cls(reader, writer)
            except ConnectionRefusedError:
                if loop.time() > deadline:
                    raise PageServerError(f"CRIU's page server did not listen on port {port}") from None
                await asyncio.sleep(0.001)  # the workload is frozen meanwhile: ask often

    async def ask(self, request: Request) -> Reply:
        self._writer.write(request.for_criu())
        await self._writer.drain()
        try:
            if request.closes:
                return Reply(b"", await self._reader.readexactly(STATUS.size))
            header = await self._reader.readexactly(HEADER.size)
            nr_pages = HEADER.unpack(header)[1]
            if nr_pages > request.nr_pages:
                raise PageServerError(f"page server sent {nr_pages} pages for a request of {request.nr_pages}")
            return Reply(header, await self._reader.readexactly(nr_pages * PAGE_SIZE))
        except asyncio.IncompleteReadError as exc:
            raise PageServerError("CRIU's page server closed the session mid-reply") from exc

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def free_local_port() -> int:
    """A loopback port free right now (CRIU binds it a moment later; a lost race fails the dump)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
