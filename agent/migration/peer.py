"""Agent-to-agent sessions: mutual TLS on the peer port, then one encrypted stream channel each.

The initiator first names the migration in a short preamble inside TLS (the stream's key schedule
is salted with the migration id, so the responder must know it before the HELLOs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import struct
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.checkpoint.images import PAGE_SIZE
from agent.config import AgentConfig
from agent.migration.failpoints import Failpoints
from agent.migration.link import FileIn, Incoming, Link, PagesIn, PeerFailed
from agent.stream import (
    Channel,
    Control,
    FileChunk,
    FileDone,
    FileStart,
    PageBatch,
    StreamOptions,
    TlsSocket,
    connect_tls,
    establish,
)
from agent.stream.links import read_exact
from core.errors import FerrymanError
from core.ids import check_migration_id
from core.security.tls import client_context, parse_peer_listen, peer_identity, server_context
from core.tasks import TaskSet

log = logging.getLogger(__name__)

_PREAMBLE = struct.Struct("!4sH")
_MAGIC = b"FMP1"
_ZERO = bytes(PAGE_SIZE)

SessionHandler = Callable[[Link, str], Awaitable[None]]


class StreamChannel:
    """agent.stream's Channel in the shape the migration Link wants; received files land in `files_dir`."""

    def __init__(self, channel: Channel, files_dir: Path) -> None:
        self._ch = channel
        self.files_dir = files_dir
        self._file: tuple[str, int, Path] | None = None  # (name, fd, temp path)

    @property
    def bytes_raw(self) -> int:
        return self._ch.sent.payload_bytes + self._ch.received.payload_bytes

    @property
    def bytes_wire(self) -> int:
        return self._ch.sent.wire_bytes + self._ch.received.wire_bytes

    async def send_control(self, obj: dict[str, Any]) -> None:
        await self._ch.send_control(obj)

    async def send_file(self, path: Path | bytes, name: str) -> None:
        await self._ch.send_file(path, name)

    async def send_pages(self, keys: array[int], data: bytes, zeros: array[int]) -> None:
        if zeros:
            # The channel finds zero pages itself and sends only their numbers; keep address order so
            # the receiver's store mirrors the dump's layout.
            keys, data = _merge_zero_pages(keys, data, zeros)
        if keys:
            await self._ch.send_pages(keys, data)

    async def recv(self) -> Incoming:
        while True:
            msg = await self._ch.receive()
            if msg is None:
                raise PeerFailed("the peer ended the stream")
            if isinstance(msg, Control):
                return msg
            if isinstance(msg, PageBatch):
                return PagesIn(keys=msg.pages, data=msg.data, zeros=msg.zero_pages)
            if isinstance(msg, FileStart):
                self._start_file(msg.path)
            elif isinstance(msg, FileChunk):
                self._write_chunk(msg)
            elif isinstance(msg, FileDone):
                return self._finish_file(msg)

    def _start_file(self, name: str) -> None:
        self.files_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.files_dir / f".{name}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._file = (name, fd, tmp)

    def _write_chunk(self, chunk: FileChunk) -> None:
        if self._file is None or self._file[0] != chunk.path:
            raise PeerFailed(f"file data for {chunk.path!r} outside its file")
        os.pwrite(self._file[1], chunk.data, chunk.offset)

    def _finish_file(self, done: FileDone) -> FileIn:
        if self._file is None or self._file[0] != done.path:
            raise PeerFailed(f"end of {done.path!r} outside its file")
        name, fd, tmp = self._file
        self._file = None
        os.close(fd)
        final = self.files_dir / name
        tmp.replace(final)  # verified by the channel (size and SHA-256) before FileDone arrived
        return FileIn(name=name, path=final, size=done.size)

    async def abort(self, reason: str) -> None:
        await self._ch.abort(reason)

    async def close(self) -> None:
        if self._file is not None:
            os.close(self._file[1])
            self._file = None
        await self._ch.close()


def _merge_zero_pages(keys: array[int], data: bytes, zeros: array[int]) -> tuple[array[int], bytes]:
    merged = sorted([(k, i) for i, k in enumerate(keys)] + [(k, -1) for k in zeros])
    view = memoryview(data)
    pages = [_ZERO if i < 0 else view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for _, i in merged]
    return array("Q", (k for k, _ in merged)), b"".join(pages)


class PeerEndpoint:
    """Dials peers for outgoing sessions and serves the peer port for incoming ones."""

    def __init__(self, config: AgentConfig, host_name: str, failpoints: Failpoints | None = None) -> None:
        self.config = config
        self.host_name = host_name
        self.failpoints = failpoints or Failpoints()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sessions = TaskSet()
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None

    def _files_dir(self, migration_id: str) -> Path:
        return Path(self.config.migration.work_dir) / migration_id / "images"

    def _link(self, channel: Channel, migration_id: str) -> Link:
        return Link(StreamChannel(channel, self._files_dir(migration_id)), self.config.migration.idle_timeout)

    async def connect(self, host: str, migration_id: str) -> Link:
        address = next((p.address for p in self.config.peers if p.name == host), None)
        if address is None:
            raise PeerFailed(f"no address for peer {host}")
        addr, port = parse_peer_listen(address) or ("", 0)
        if self._client_ctx is None:
            self._client_ctx = client_context(self.config.tls)
        tls = await connect_tls(addr, port, self._client_ctx, server_hostname=host, handshake_timeout=10)
        try:
            if peer_identity(tls.getpeercert()) != host:  # type: ignore[arg-type]
                raise PeerFailed(f"{address} is not {host}")
            preamble = json.dumps({"migration": migration_id}).encode()
            await asyncio.to_thread(tls.sendall, _PREAMBLE.pack(_MAGIC, len(preamble)) + preamble)
            corrupt = self.failpoints.action("stream.corrupt_frame")  # e.g. "stream.corrupt_frame=40"
            options = StreamOptions(
                leave_tls=not self.config.migration.stream_tls_records, corrupt_frame=int(corrupt or 0)
            )
            channel = await establish(
                tls, migration_id, self.host_name, initiator=True, expected_peer=host, options=options
            )
        except BaseException:
            tls.abort()
            tls.close()
            raise
        return self._link(channel, migration_id)

    async def serve(self, handler: SessionHandler) -> None:
        listen = parse_peer_listen(self.config.api.peer_listen)
        if listen is None:
            return
        self._server_ctx = server_context(self.config.tls)
        sock = socket.create_server(listen, reuse_port=False, backlog=64)
        sock.setblocking(False)
        self._listener = sock
        self._accepting = asyncio.create_task(self._accept_loop(sock, handler), name="peer-accept")
        log.info("peer listener ready", extra={"listen": self.config.api.peer_listen})

    async def _accept_loop(self, sock: socket.socket, handler: SessionHandler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, addr = await loop.sock_accept(sock)
            self._sessions.spawn(self._session(conn, addr, handler), f"peer-{addr[0]}")

    async def _session(self, conn: socket.socket, addr: Any, handler: SessionHandler) -> None:
        tls: TlsSocket | None = None
        try:
            assert self._server_ctx is not None
            tls = await asyncio.to_thread(TlsSocket.handshake, conn, self._server_ctx, server_side=True, timeout=10)
            peer = peer_identity(tls.getpeercert())  # type: ignore[arg-type]
            head = await asyncio.to_thread(_read_preamble, tls, _PREAMBLE.size)
            magic, length = _PREAMBLE.unpack(head)
            if magic != _MAGIC or length > 4096:
                raise PeerFailed("not a ferryman peer session")
            migration_id = check_migration_id(
                str(json.loads(await asyncio.to_thread(_read_preamble, tls, length))["migration"])
            )
            options = StreamOptions(leave_tls=not self.config.migration.stream_tls_records)
            channel = await establish(
                tls, migration_id, self.host_name, initiator=False, expected_peer=peer, options=options
            )
        except (FerrymanError, OSError, ValueError, KeyError) as exc:
            log.warning("peer session refused", extra={"address": str(addr[0]), "error": str(exc)})
            if tls is not None:
                tls.abort()
                tls.close()
            else:
                conn.close()
            return
        tls = None
        await handler(self._link(channel, migration_id), peer)

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        await self._sessions.close()


def _read_preamble(tls: TlsSocket, n: int) -> bytes:
    buf = bytearray(n)
    if read_exact(tls, memoryview(buf)) != n:
        raise PeerFailed("the peer closed the session")
    return bytes(buf)
