"""A real HTTP receiver for the coordinator's Alertmanager-compatible webhook, in any netns.

Its listening socket is made inside the namespace (a socket keeps the namespace it was created in)
and served by aiohttp in the test's own event loop, so the receiver runs in the test process while
the coordinator reaches it on the fabric's address.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from aiohttp import web

from tests.harness.netns import call_in_netns


def _listen(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


class AlertReceiver:
    """Collects every POSTed webhook body; `url` is what `[alerts] webhook_url` names."""

    def __init__(self, netns: str, host: str) -> None:
        self._sock = call_in_netns(netns, _listen, host)
        self.url = f"http://{host}:{self._sock.getsockname()[1]}/alerts"
        self.bodies: list[dict[str, Any]] = []
        self.arrived: list[float] = []
        """time.time() when each body had arrived, in order."""
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.json()
        async with self._arrived:
            self.bodies.append(body)
            self.arrived.append(time.time())
            self._arrived.notify_all()
        return web.json_response({})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/alerts", self._post)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def wait_for(self, count: int, within: float = 30.0) -> list[dict[str, Any]]:
        """The bodies once there are `count` of them (AssertionError after `within` seconds)."""
        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.bodies) >= count), within)
            except TimeoutError:
                raise AssertionError(f"{len(self.bodies)} alert(s) within {within:g}s, expected {count}") from None
        return list(self.bodies)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._sock.close()
