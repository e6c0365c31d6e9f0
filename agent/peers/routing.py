"""Session kinds: the preamble that names one, and the router that hands a session to its handler.

Before the stream's HELLOs the initiator sends, inside TLS, `FMP1`, a 2-byte length and a JSON
object `{"kind": KIND, KIND: ID}`: the kind names what the session is for, and the session id under
the kind's own key. The stream's key schedule is salted with that id, so the responder needs it
before the HELLOs. A migration's preamble is `{"kind": "migration", "migration": "mig-..."}`, which
agents from before session kinds read as they always did; from them, `{"migration": ...}` alone still
means a migration session.

Each kind is registered with a check for its ids: an id names files on this host (a migration's
work directory), so it is checked here, before any handler sees it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.peers.errors import PeerFailed, UnknownSessionKind
from agent.stream import Channel

PREAMBLE = struct.Struct("!4sH")
MAGIC = b"FMP1"
MAX_PREAMBLE = 4096
LEGACY_KIND = "migration"
"""The kind of a preamble without "kind" (agents from before session kinds)."""


@dataclass(frozen=True)
class PeerSession:
    """One inbound session, its stream established."""

    kind: str
    id: str
    """The session id the preamble named (and the stream's key schedule used): e.g. a migration id."""
    peer: str
    """The peer's host name, from its certificate."""
    stream: Channel


SessionHandler = Callable[[PeerSession], Awaitable[None]]
"""Serves one session; it owns the stream (closes it) from then on."""


def encode_preamble(kind: str, session_id: str) -> bytes:
    body = json.dumps({"kind": kind, kind: session_id}).encode()
    return PREAMBLE.pack(MAGIC, len(body)) + body


def preamble_length(head: bytes) -> int:
    """The JSON length from the preamble's fixed head; PeerFailed unless it is ours."""
    magic, length = PREAMBLE.unpack(head)
    if magic != MAGIC or length > MAX_PREAMBLE:
        raise PeerFailed("not a ferryman peer session")
    return int(length)


def parse_preamble(body: bytes) -> tuple[str, str]:
    """(kind, session id) from the preamble's JSON; PeerFailed when it is anything else."""
    try:
        data = json.loads(body)
    except ValueError:
        raise PeerFailed("the session preamble is not JSON") from None
    if not isinstance(data, dict):
        raise PeerFailed("the session preamble is not a JSON object")
    kind = data.get("kind", LEGACY_KIND)
    if not isinstance(kind, str) or set(data) - {"kind", kind} or not isinstance(data.get(kind), str):
        raise PeerFailed(f'expected a session preamble {{"kind": KIND, KIND: ID}}, got keys {sorted(data)}')
    return kind, data[kind]


@dataclass(frozen=True)
class _Route:
    handler: SessionHandler
    check_id: Callable[[str], object]
    speaks: tuple[int, ...]


class SessionRouter:
    """Session kind -> the handler that serves it, and the check its ids must pass."""

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}

    @property
    def kinds(self) -> list[str]:
        return sorted(self._routes)

    def add(
        self, kind: str, handler: SessionHandler, check_id: Callable[[str], object], speaks: tuple[int, ...] = ()
    ) -> None:
        """Serve sessions of `kind` with `handler`; `check_id` raises on an id it refuses. `speaks`: the
        versions of the kind's protocol this agent speaks, announced in the HELLO of its sessions both
        ways (the peer's are the stream's `peer_speaks`)."""
        if kind in self._routes:
            raise ValueError(f"session kind {kind!r} already has a handler")
        self._routes[kind] = _Route(handler, check_id, speaks)

    def speaks(self, kind: str) -> tuple[int, ...]:
        """The versions of `kind`'s protocol this agent announces (none for a kind not served here)."""
        route = self._routes.get(kind)
        return route.speaks if route is not None else ()

    def route(self, kind: str, session_id: str) -> SessionHandler:
        """The handler for a session of `kind` with `session_id`: UnknownSessionKind for a kind nobody
        serves here; the kind's id check's error (a FerrymanError) for an id it refuses."""
        route = self._routes.get(kind)
        if route is None:
            known = ", ".join(repr(k) for k in self.kinds) or "none"
            raise UnknownSessionKind(f"peer session kind {kind!r} is not served here (kinds: {known})")
        route.check_id(session_id)
        return route.handler
