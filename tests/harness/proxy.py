"""A fault-injecting HTTP proxy in front of a real registry: cuts or corrupts chosen blobs.

It stands for a flaky network or a corrupting middlebox; the registry behind it is real.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tests.harness.registry import free_port


@dataclass
class ProxyLog:
    method: str
    path: str
    range: str | None


@dataclass
class FaultyProxy:
    upstream: str
    """Base URL of the real registry, e.g. http://127.0.0.1:5000."""
    port: int = field(default_factory=free_port)
    corrupt: set[str] = field(default_factory=set)
    """Blob digests whose bytes get one bit flipped."""
    cut_after: dict[str, int] = field(default_factory=dict)
    """Blob digest -> byte count after which the connection drops (once per digest)."""
    blob_delay: float = 0.0
    """Seconds to hold every blob GET before forwarding it: keeps concurrent pulls overlapping."""
    rate: float = 0.0
    """Bytes per second of the link every blob GET's body shares (0: as fast as the registry)."""
    _link_free_at: float = 0.0
    requests: list[ProxyLog] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _on_link(self, nbytes: int) -> None:
        """Wait until `nbytes` more have crossed the shared link: each chunk takes its turn."""
        loop = asyncio.get_running_loop()
        start = max(loop.time(), self._link_free_at)
        self._link_free_at = start + nbytes / self.rate
        await asyncio.sleep(self._link_free_at - loop.time())

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        self.requests.append(ProxyLog(request.method, request.path, request.headers.get("Range")))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        body = await request.read()
        digest = request.path.rsplit("/", 1)[-1] if "/blobs/" in request.path else ""
        if digest and request.method == "GET" and self.blob_delay:
            await asyncio.sleep(self.blob_delay)
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=True,
        ) as upstream:
            resp = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in ("transfer-encoding", "connection", "content-encoding"):
                    resp.headers[key] = value
            await resp.prepare(request)
            sent = 0
            limit = self.cut_after.pop(digest, None) if request.method == "GET" else None
            flip = digest in self.corrupt and request.method == "GET"
            async for chunk in upstream.content.iter_chunked(64 << 10):
                if flip and chunk:
                    chunk = bytes([chunk[0] ^ 0x01]) + chunk[1:]
                    flip = False
                if limit is not None and sent + len(chunk) >= limit:
                    await resp.write(chunk[: limit - sent])
                    assert request.transport is not None
                    request.transport.close()  # the connection breaks mid-blob
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
                if digest and self.rate:
                    await self._on_link(len(chunk))
            await resp.write_eof()
            return resp
