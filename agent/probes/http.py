"""HTTP GET from inside a container's network namespace (aiohttp over a tunnel, agent/probes/netns.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from agent.probes.errors import ProbeFailed
from agent.probes.netns import tunnel


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    reason: str
    body: bytes
    """The start of the body, at most the `max_body` asked for."""


async def http_get(netns: str, host: str, port: int, path: str, max_body: int) -> HttpAnswer:
    """GET http://host:port/path as seen from `netns`, redirects not followed; ProbeFailed when no
    answer comes (refused, reset, not HTTP). The body is cut at `max_body`. The caller bounds the time."""
    return await _request(netns, host, port, "GET", path, None, {}, max_body, longer_fails=False)


async def http_exchange(
    netns: str, host: str, port: int, method: str, path: str, body: bytes, content_type: str, max_body: int
) -> HttpAnswer:
    """One request with a body to http://host:port/path as seen from `netns` (a stage's state
    contract, docs/chains.md); ProbeFailed when no answer comes or the answer is longer than
    `max_body`. The caller bounds the time."""
    headers = {"Content-Type": content_type}
    return await _request(netns, host, port, method, path, body, headers, max_body, longer_fails=True)


class Exchange:
    """One request to a stage, its connection made ahead (`opened_exchange`): sending it then costs
    no thread, no namespace switch and no TCP handshake. Used once."""

    def __init__(self, socket_path: str, host: str, port: int) -> None:
        self._socket_path, self._host, self._port = socket_path, host, port

    async def send(self, method: str, path: str, body: bytes, content_type: str, max_body: int) -> HttpAnswer:
        """As `http_exchange`, over the connection made ahead."""
        headers = {"Content-Type": content_type}
        return await _send(self._socket_path, self._host, self._port, method, path, body, headers, max_body, True)


@contextlib.asynccontextmanager
async def opened_exchange(netns: str, host: str, port: int) -> AsyncIterator[Exchange]:
    """A connection to host:port as seen from `netns`, made now, for one `Exchange.send` later
    (ProbeFailed here when the port refuses). The caller bounds the time."""
    async with tunnel(netns, host, port) as socket_path:
        yield Exchange(socket_path, host, port)


async def _request(
    netns: str,
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    max_body: int,
    *,
    longer_fails: bool,
) -> HttpAnswer:
    async with tunnel(netns, host, port) as socket_path:
        return await _send(socket_path, host, port, method, path, body, headers, max_body, longer_fails)


async def _send(
    socket_path: str,
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    max_body: int,
    longer_fails: bool,
) -> HttpAnswer:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = f"http://{authority}{path}"
    connector = aiohttp.UnixConnector(path=socket_path, force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, auto_decompress=False) as session,
            session.request(method, url, data=body, headers=headers, allow_redirects=False) as resp,
        ):
            # read(n) gives what has arrived, up to n: a large answer (a stage's state) takes many.
            limit = max_body + 1 if longer_fails else max_body
            data = bytearray()
            while len(data) < limit:
                chunk = await resp.content.read(limit - len(data))
                if not chunk:
                    break
                data += chunk
            if len(data) > max_body:
                raise ProbeFailed(f"{method} {url}: answer longer than {max_body} bytes")
            return HttpAnswer(resp.status, resp.reason or "", bytes(data))
    except aiohttp.ClientError as exc:
        raise ProbeFailed(f"{method} {url}: {exc}") from exc
