"""Both ends of a migration link over a real stream channel on loopback TCP, for tests that play one
agent against the other without a mesh."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from agent.migration.link import Link
from agent.peers import StreamChannel
from agent.stream import accept_receiver, open_sender


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one real TCP connection on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


@contextlib.asynccontextmanager
async def link_pair(files: Path, migration_id: str) -> AsyncIterator[tuple[Link, Link]]:
    """(source, target): the source agent's end and the target agent's end of one migration."""
    a, b = tcp_pair()
    sender, receiver = await asyncio.gather(
        open_sender(a, migration_id, "source-host"), accept_receiver(b, migration_id, "target-host")
    )
    try:
        yield (
            Link(StreamChannel(sender, files / "source-files"), idle_timeout=10),
            Link(StreamChannel(receiver, files / "target-files"), idle_timeout=10),
        )
    finally:
        await asyncio.gather(sender.close(), receiver.close())
