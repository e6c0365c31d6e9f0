"""The migration's sessions on the peer port (agent.peers): the `migration` session kind.

Outbound, a migration link is a session of this kind whose id is the migration id; inbound, the
port routes such sessions here and the service reads their first message (protocol.OPENERS).
Received image files land in the migration's work directory, `<work_dir>/<id>/images`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from agent.config import AgentConfig
from agent.migration.link import Link
from agent.migration.protocol import ACCEPTED_PROTOCOLS
from agent.peers import PeerSession, SessionHandler, StreamChannel
from agent.stream import Channel
from core.files import confined
from core.ids import check_migration_id

KIND = "migration"


class PeerPort(Protocol):
    """The part of agent.peers.PeerEndpoint migrations use."""

    async def connect(self, host: str, kind: str, session_id: str) -> Channel: ...


class MigrationSessions:
    """Migration links over the peer port: dialled, and made of the inbound `migration` sessions."""

    speaks = tuple(sorted(ACCEPTED_PROTOCOLS))
    """The migration protocol versions this agent announces in every migration session's HELLO."""

    def __init__(self, port: PeerPort, config: AgentConfig) -> None:
        self._port = port
        self.config = config

    def _link(self, stream: Channel, migration_id: str) -> Link:
        files = confined(self.config.migration.work_dir, migration_id, "images")
        return Link(StreamChannel(stream, files), self.config.migration.idle_timeout)

    async def connect(self, host: str, migration_id: str) -> Link:
        check_migration_id(migration_id)
        return self._link(await self._port.connect(host, KIND, migration_id), migration_id)

    def handler(self, handle: Callable[[Link, str, str], Awaitable[None]]) -> SessionHandler:
        """The port's handler for this kind: each session as a link, with the peer's host and the
        session's migration id (from its preamble), to `handle`."""

        async def on_session(session: PeerSession) -> None:
            await handle(self._link(session.stream, session.id), session.peer, session.id)

        return on_session

    @staticmethod
    def check_id(session_id: str) -> None:
        """The ids this kind accepts in a preamble: migration ids (they name a work directory)."""
        check_migration_id(session_id)
