"""The peer port: dials other agents and serves inbound sessions, mutual TLS then one stream each.

`connect(host, kind, session_id)` returns an established stream to the peer named `host` in
`[[peers]]`, after checking that its certificate names that host. `serve()` accepts on
`[api] peer_listen`; each session's preamble (routing.py) names its kind and id, and the router
hands the established stream to that kind's handler. A session that fails before that (TLS, the
preamble, an unknown kind, a refused id, the stream's handshake) is logged and closed.

Who may open a session: a host listed in `[[peers]]`, with an `agent` certificate of the fleet CA
(an `ops` certificate, or a host this agent does not know, is refused after the TLS handshake).
What an unauthenticated or idle connection can hold: its handshake and preamble run in a thread
pool of the port's own (never the event loop's default pool, which the API's file I/O uses), under
one deadline (`[api] peer_handshake_timeout`), and only `peer_max_pending` of them at once,
`peer_max_pending_per_address` from one address; established sessions are limited per peer and in
total. A connection over a limit is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

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
from agent.stream import Channel, StreamOptions, StreamTotals, TlsSocket, connect_tls, establish
from agent.stream.links import read_exact
from core.errors import FerrymanError
from core.security.pki import Role
from core.security.reload import TlsContexts
from core.security.tls import client_context, parse_peer_listen, peer_identity, peer_role, server_context
from core.tasks import TaskSet

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class PortLimits:
    """The peer port's connection limits (from `[api]`); the decisions are pure."""

    max_pending: int
    max_pending_per_address: int
    max_sessions: int
    max_sessions_per_peer: int

    def refuse_pending(self, total: int, from_address: int) -> str | None:
        """Why a new connection is closed on arrival (None: admitted), given those already pending."""
        if total >= self.max_pending:
            return f"{total} peer connections are in their handshake (api.peer_max_pending)"
        if from_address >= self.max_pending_per_address:
            return f"{from_address} peer connections from this address are in their handshake"
        return None

    def refuse_session(self, total: int, with_peer: int) -> str | None:
        """Why an authenticated session is refused (None: admitted), given those already open."""
        if total >= self.max_sessions:
            return f"{total} peer sessions are open (api.peer_max_sessions)"
        if with_peer >= self.max_sessions_per_peer:
            return f"{with_peer} sessions with this peer are open (api.peer_max_sessions_per_peer)"
        return None


def refuse_identity(role: Role | None, host: str, known_peers: set[str]) -> str | None:
    """Why a certificate may not open peer sessions here (None: it may)."""
    if role is not Role.AGENT:
        return f"{host!r} presents a {role.value if role else 'role-less'} certificate: only agents open peer sessions"
    if host not in known_peers:
        return f"{host!r} is not one of this agent's [[peers]]"
    return None


class FailpointActions(Protocol):
    """Fault tests' failpoints (agent.migration.failpoints.Failpoints): this port reads
    `stream.corrupt_frame` at every dial, the blob server (agent.sharing) `sharing.serve`."""

    def action(self, name: str) -> str | None: ...


class _NoFailpoints:
    def action(self, name: str) -> str | None:
        return None


NO_FAILPOINTS: FailpointActions = _NoFailpoints()


class PeerEndpoint:
    """Dials peers for outgoing sessions and serves the peer port for incoming ones."""

    def __init__(
        self,
        config: AgentConfig,
        host_name: str,
        failpoints: FailpointActions | None = None,
        totals: StreamTotals | None = None,
        contexts: TlsContexts | None = None,
    ) -> None:
        self.config = config
        self.host_name = host_name
        self.failpoints = failpoints or NO_FAILPOINTS
        self.totals = totals if totals is not None else StreamTotals()
        """What every session's stream sent and received, in both directions (the agent's stream metrics)."""
        self.router = SessionRouter()
        """Session kinds served here: add each before serve()."""
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sessions = TaskSet()
        # Handshakes run in worker threads: a reload gives them new contexts instead of changing these.
        contexts = contexts if contexts is not None else TlsContexts()
        self._server_ctx = contexts.renewed(config.tls, lambda: server_context(config.tls))
        self._client_ctx = contexts.renewed(config.tls, lambda: client_context(config.tls))
        api = config.api
        self.limits = PortLimits(
            max_pending=api.peer_max_pending,
            max_pending_per_address=api.peer_max_pending_per_address,
            max_sessions=api.peer_max_sessions,
            max_sessions_per_peer=api.peer_max_sessions_per_peer,
        )
        self._pending: Counter[str] = Counter()  # remote address -> connections in their handshake
        self._open: Counter[str] = Counter()  # peer host -> established sessions
        # Handshakes and preamble reads block a thread each: never the loop's default pool.
        self._handshakes = ThreadPoolExecutor(max_workers=api.peer_max_pending, thread_name_prefix="peer-handshake")

    async def connect(self, host: str, kind: str, session_id: str) -> Channel:
        """A new session of `kind` to the peer `host`: its established stream (the caller closes it)."""
        address = next((p.address for p in self.config.peers if p.name == host), None)
        if address is None:
            raise PeerFailed(f"no address for peer {host}")
        addr, port = parse_peer_listen(address) or ("", 0)
        tls = await connect_tls(addr, port, self._client_ctx.get(), server_hostname=host, handshake_timeout=10)
        try:
            if peer_identity(tls.getpeercert()) != host:  # type: ignore[arg-type]
                raise PeerFailed(f"{address} is not {host}")
            await asyncio.to_thread(tls.sendall, encode_preamble(kind, session_id))
            corrupt = self.failpoints.action("stream.corrupt_frame")  # e.g. "stream.corrupt_frame=40"
            return await self._establish(
                tls, session_id, host, initiator=True, speaks=self.router.speaks(kind), corrupt_frame=int(corrupt or 0)
            )
        except BaseException:
            tls.abort()
            tls.close()
            raise

    async def _establish(
        self,
        tls: TlsSocket,
        session_id: str,
        peer: str,
        *,
        initiator: bool,
        speaks: tuple[int, ...],
        corrupt_frame: int = 0,
    ) -> Channel:
        """A session's stream over an authenticated connection; its traffic counts in `totals`."""
        options = StreamOptions(
            leave_tls=not self.config.migration.stream_tls_records, speaks=speaks, corrupt_frame=corrupt_frame
        )
        name = self.host_name
        return await establish(
            tls, session_id, name, initiator=initiator, expected_peer=peer, options=options, totals=self.totals
        )

    async def serve(self) -> None:
        listen = parse_peer_listen(self.config.api.peer_listen)
        if listen is None:
            return
        self._server_ctx.get()  # TlsConfigError before anything listens
        sock = socket.create_server(listen, reuse_port=False, backlog=64)
        sock.setblocking(False)
        self._listener = sock
        self._accepting = asyncio.create_task(self._accept_loop(sock), name="peer-accept")
        log.info("peer listener ready", extra={"listen": self.config.api.peer_listen, "kinds": self.router.kinds})

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, addr = await loop.sock_accept(sock)
            address = str(addr[0])
            refused = self.limits.refuse_pending(sum(self._pending.values()), self._pending[address])
            if refused is not None:
                log.warning("peer connection refused", extra={"address": address, "error": refused})
                conn.close()
                continue
            self._pending[address] += 1
            self._sessions.spawn(self._session(conn, address), f"peer-{address}")

    async def _blocking(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._handshakes, lambda: call(*args, **kwargs))

    async def _session(self, conn: socket.socket, address: str) -> None:
        tls: TlsSocket | None = None
        try:
            try:
                tls, peer, kind, session_id = await self._admit(conn)
            finally:
                self._pending[address] -= 1
                if self._pending[address] <= 0:
                    del self._pending[address]
            handler = self.router.route(kind, session_id)  # an unknown kind or a bad id stops here
            refused = self.limits.refuse_session(sum(self._open.values()), self._open[peer])
            if refused is not None:
                raise PeerFailed(refused)
            stream = await self._establish(tls, session_id, peer, initiator=False, speaks=self.router.speaks(kind))
        except (FerrymanError, OSError, ValueError, KeyError) as exc:
            log.warning("peer session refused", extra={"address": address, "error": str(exc)})
            if tls is not None:
                tls.abort()
                tls.close()
            else:
                conn.close()
            return
        tls = None
        with self._counted(peer):
            try:
                await handler(PeerSession(kind=kind, id=session_id, peer=peer, stream=stream))
            except Exception:
                # A handler answers its peer's failures itself; anything else is a bug here: logged, closed.
                log.exception("peer session handler failed", extra={"peer": peer, "kind": kind, "id": session_id})
                await stream.abort("internal error")

    async def _admit(self, conn: socket.socket) -> tuple[TlsSocket, str, str, str]:
        """TLS, identity and preamble of an inbound connection, under one deadline."""
        timeout = self.config.api.peer_handshake_timeout
        deadline = time.monotonic() + timeout
        ctx = self._server_ctx.get()
        tls = await self._blocking(TlsSocket.handshake, conn, ctx, server_side=True, timeout=timeout)
        try:
            cert = tls.getpeercert()
            peer = peer_identity(cert)  # type: ignore[arg-type]
            refused = refuse_identity(peer_role(cert), peer, {p.name for p in self.config.peers})  # type: ignore[arg-type]
            if refused is not None:
                raise PeerFailed(refused)
            tls.set_timeout(max(deadline - time.monotonic(), 0.001))
            length = preamble_length(await self._blocking(_read_preamble, tls, PREAMBLE.size))
            tls.set_timeout(max(deadline - time.monotonic(), 0.001))
            kind, session_id = parse_preamble(await self._blocking(_read_preamble, tls, length))
            tls.set_timeout(None)
        except BaseException:
            tls.abort()
            tls.close()
            raise
        return tls, peer, kind, session_id

    @contextmanager
    def _counted(self, peer: str) -> Iterator[None]:
        self._open[peer] += 1
        try:
            yield
        finally:
            self._open[peer] -= 1
            if self._open[peer] <= 0:
                del self._open[peer]

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        await self._sessions.close()
        self._handshakes.shutdown(wait=False, cancel_futures=True)


def _read_preamble(tls: TlsSocket, n: int) -> bytes:
    buf = bytearray(n)
    if read_exact(tls, memoryview(buf)) != n:
        raise PeerFailed("the peer closed the session")
    return bytes(buf)
