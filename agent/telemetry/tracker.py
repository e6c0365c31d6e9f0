"""The coordinator's layer tracker, asked over mutual TLS: who holds a blob, and what this host fetches.

Both calls are best effort and bounded by `[sharing] probe_timeout`: a pull never waits on a slow
or absent coordinator for longer than that, and falls back to the static `[[peers]]`
(agent/images/directory.py). Holders are hints: a pull asks each peer itself before reading from it.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

import aiohttp
from google.protobuf import json_format

from agent.config import CoordinatorConfig
from agent.telemetry.push import CoordinatorLink, PushFailed
from proto.ferryman.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)


class TrackerUnavailable(Exception):
    """The coordinator did not answer a tracker call (the reason is the message)."""


class TrackerClient:
    def __init__(self, host: str, coordinator: CoordinatorConfig, ssl_context: ssl.SSLContext, timeout: float) -> None:
        self.host = host
        self._link = CoordinatorLink(coordinator)
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl), timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def holders(self, digests: Sequence[str]) -> list[pb.LayerHolder]:
        """Holders of `digests`, complete ones first (no digests: every host serving blobs)."""
        body = await self._post("/v1/layers/holders", pb.LayerHoldersRequest(digests=list(digests)))
        answer = pb.LayerHolders()
        try:
            json_format.Parse(body, answer, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise TrackerUnavailable(f"unreadable holders answer: {exc}") from exc
        return list(answer.holders)

    async def announce(self, fetching: Sequence[str] = (), dropped: Sequence[str] = ()) -> None:
        await self._post(
            "/v1/layers/announce", pb.LayerAnnouncement(host=self.host, fetching=list(fetching), dropped=list(dropped))
        )

    async def _post(self, path: str, message: pb.LayerHoldersRequest | pb.LayerAnnouncement) -> str:
        try:
            return await self._link.post(self._http(), path, message)
        except PushFailed as exc:
            raise TrackerUnavailable(str(exc)) from exc
