"""The peer port: dials other agents and serves inbound sessions, mutual TLS then one stream each.

`connect(host, kind, session_id)` returns an established stream to the peer named `host` in
`[[peers]]`, after checking that its certificate names that host. `serve()` accepts on
`[api] peer_listen`; each session's preamble (routing.py) names its kind and id, and the router
hands the established stream to that kind's handler. A session that fails before that (TLS, the
preamble, an unknown kind, a refused id, the stream's handshake) is logged and closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, Protocol

from agent.config import AgentConfig
from agent.peers.errors import PeerFailed
from agent.peers.routing import (
    PREAMBLE,
    PeerSession,
    SessionRouter,
    encode_preamble,
    parse_preamble,
    preamble_length,
)
from agent.stream import Channel, StreamOptions, TlsSocket, connect_tls, establish
from agent.stream.links import read_exact
from core.errors import FerrymanError
from core.security.tls import client_context, parse_peer_listen, peer_identity, server_context
from core.tasks import TaskSet

log = logging.getLogger(__name__)


class FailpointActions(Protocol):
    """Fault tests' failpoints (agent.migration.failpoints.Failpoints): this port reads
    `stream.corrupt_frame` at every dial."""

    def action(self, name: str) -> str | None: ...


class _NoFailpoints:
    def action(self, name: str) -> str | None:
        return None


class PeerEndpoint:
    """Dials peers for outgoing sessions and serves the peer port for incoming ones."""

    def __init__(self, config: AgentConfig, host_name: str, failpoints: FailpointActions | None = None) -> None:
        self.config = config
        self.host_name = host_name
        self.failpoints = failpoints or _NoFailpoints()
        self.router = SessionRouter()
        """Session kinds served here: add each before serve()."""
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sessions = TaskSet()
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None

    async def connect(self, host: str, kind: str, session_id: str) -> Channel:
        """A new session of `kind` to the peer `host`: its established stream (the caller closes it)."""
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
            await asyncio.to_thread(tls.sendall, encode_preamble(kind, session_id))
            corrupt = self.failpoints.action("stream.corrupt_frame")  # e.g. "stream.corrupt_frame=40"
            options = StreamOptions(
                leave_tls=not self.config.migration.stream_tls_records, corrupt_frame=int(corrupt or 0)
            )
            return await establish(tls, session_id, self.host_name, initiator=True, expected_peer=host, options=options)
        except BaseException:
            tls.abort()
            tls.close()
            raise

    async def serve(self) -> None:
        listen = parse_peer_listen(self.config.api.peer_listen)
        if listen is None:
            return
        self._server_ctx = server_context(self.config.tls)
        sock = socket.create_server(listen, reuse_port=False, backlog=64)
        sock.setblocking(False)
        self._listener = sock
        self._accepting = asyncio.create_task(self._accept_loop(sock), name="peer-accept")
        log.info("peer listener ready", extra={"listen": self.config.api.peer_listen, "kinds": self.router.kinds})

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, addr = await loop.sock_accept(sock)
            self._sessions.spawn(self._session(conn, addr), f"peer-{addr[0]}")

    async def _session(self, conn: socket.socket, addr: Any) -> None:
        tls: TlsSocket | None = None
        try:
            assert self._server_ctx is not None
            tls = await asyncio.to_thread(TlsSocket.handshake, conn, self._server_ctx, server_side=True, timeout=10)
            peer = peer_identity(tls.getpeercert())  # type: ignore[arg-type]
            length = preamble_length(await asyncio.to_thread(_read_preamble, tls, PREAMBLE.size))
            kind, session_id = parse_preamble(await asyncio.to_thread(_read_preamble, tls, length))
            handler = self.router.route(kind, session_id)  # an unknown kind or a bad id stops here
            options = StreamOptions(leave_tls=not self.config.migration.stream_tls_records)
            stream = await establish(
                tls, session_id, self.host_name, initiator=False, expected_peer=peer, options=options
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
        await handler(PeerSession(kind=kind, id=session_id, peer=peer, stream=stream))

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
