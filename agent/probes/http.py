"""HTTP GET from inside a container's network namespace (aiohttp over a tunnel, agent/probes/netns.py)."""

from __future__ import annotations

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
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = f"http://{authority}{path}"
    async with tunnel(netns, host, port) as socket_path:
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
