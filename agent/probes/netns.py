"""TCP connections made from inside a container's network namespace, and a tunnel for clients that
cannot be given a socket.

A socket belongs to the network namespace it was created in, whichever thread later uses it, so only
the `socket()` call runs in a throw-away thread that joined the namespace (agent/network/nsutil.py);
the connect and everything after it run on the event loop, under the caller's deadline.

aiohttp and grpc dial their own connections (grpc from its own threads), so `tunnel` hands them a
unix socket instead, in a fresh root-only directory, whose first connection is spliced to a TCP
connection made in the namespace. A filesystem path, not an abstract socket: those are reachable by
any process in the host's namespace, and a probe's tunnel must not be a way into a container.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from agent.network.nsutil import call_in_netns
from agent.probes.errors import ProbeFailed

PIPE_CHUNK = 64 * 1024


def netns_of(pid: int) -> str:
    """The network namespace of a container's init process, as a path setns() takes."""
    return f"/proc/{pid}/ns/net"


async def connect(netns: str, host: str, port: int) -> socket.socket:
    """A connected, non-blocking TCP socket to host:port as seen from `netns` (ProbeFailed if not).
    The caller bounds the time (asyncio.timeout) and closes the socket."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET

    def make() -> socket.socket:
        return socket.socket(family, socket.SOCK_STREAM)

    try:
        sock = await asyncio.to_thread(call_in_netns, netns, make)
    except OSError as exc:  # the namespace is gone: the container's process exited
        raise ProbeFailed(f"cannot enter the container's network namespace: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except OSError as exc:
        sock.close()
        raise ProbeFailed(f"connect {host}:{port}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def tunnel(netns: str, host: str, port: int) -> AsyncIterator[str]:
    """A unix socket path whose first connection reaches host:port in `netns`; later ones are refused.
    The TCP connection is made before the path is handed out, so a refused port fails here."""
    sock = await connect(netns, host, port)
    directory = await asyncio.to_thread(tempfile.mkdtemp, prefix="ferryman-probe-")
    path = str(Path(directory, "s"))
    spliced: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []

    async def splice(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        inner_r, inner_w = await asyncio.open_connection(sock=sock)
        writers.append(inner_w)
        try:
            await asyncio.gather(_pipe(client_r, inner_w), _pipe(inner_r, client_w))
        finally:
            inner_w.close()
            client_w.close()

    def accept(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: the splice is a task of ours, which this block cancels
        # at its end (cancelling the server's own handler task makes Python 3.11's asyncio log it).
        writers.append(client_w)
        if spliced:  # a second connection (a client's retry): the namespace socket is taken
            client_w.close()
            return
        spliced.append(asyncio.create_task(splice(client_r, client_w), name=f"probe-tunnel:{host}:{port}"))

    try:
        server = await asyncio.start_unix_server(accept, path)
        try:
            yield path
        finally:
            server.close()
            for writer in writers:
                writer.close()
            for task in spliced:
                task.cancel()
            await asyncio.gather(*spliced, return_exceptions=True)
            await server.wait_closed()
    finally:
        sock.close()
        await asyncio.to_thread(shutil.rmtree, directory, True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(PIPE_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
