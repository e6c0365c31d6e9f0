"""The blob client: asks peers whether they hold a blob, and fetches ranges of it, over mutual TLS.

Each request verifies that the server's certificate names the peer asked (hostname checking against
the peer's host name, whatever address it is reached at), and presents this host's certificate.
A probe that fails or takes longer than `[sharing] probe_timeout` counts as "not held"; a range that
goes `stall_timeout` without a byte raises PeerStalled; anything else a peer does wrong raises
PeerBlobError. Bytes are not checked here: the pull checks the whole blob's digest.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp

from agent.config import SharingConfig
from agent.sharing.errors import PeerBlobError, PeerStalled
from agent.sharing.server import AVAILABLE, SIZE, BlobState, ImageTarget
from agent.sharing.striping import ByteRange
from core.security.reload import TlsContexts
from core.security.tls import TlsFiles

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Peer:
    """A peer agent's host name (its certificate's) and blob server address (host:port)."""

    name: str
    address: str

    def url(self, digest: str) -> str:
        return f"https://{self.address}/v1/blobs/{digest}"


class PeerBlobClient:
    """One connection pool to every peer's blob server."""

    def __init__(self, config: SharingConfig, tls: TlsFiles, contexts: TlsContexts | None = None) -> None:
        self._config = config
        self._tls = tls
        self._contexts = contexts if contexts is not None else TlsContexts()
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._contexts.client(self._tls), limit=0)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def probe(self, peer: Peer, digest: str) -> BlobState | None:
        """What `peer` can serve of `digest` now; None when it holds none of it or does not answer."""
        timeout = aiohttp.ClientTimeout(total=self._config.probe_timeout)
        try:
            async with self._http().head(peer.url(digest), server_hostname=peer.name, timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                return BlobState(int(resp.headers[SIZE]), int(resp.headers[AVAILABLE]))
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            log.debug("peer probe failed", extra={"peer": peer.name, "digest": digest, "error": str(exc)})
            return None

    async def image(self, peer: Peer, name: str) -> ImageTarget | None:
        """What image `name` points at on `peer`; None when it has none or does not answer."""
        timeout = aiohttp.ClientTimeout(total=self._config.probe_timeout)
        url = f"https://{peer.address}/v1/images"
        try:
            async with self._http().get(url, params={"name": name}, server_hostname=peer.name, timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                body = await resp.json()
                return ImageTarget(str(body["digest"]), str(body["media_type"]), int(body["size"]))
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError, TypeError) as exc:
            log.debug("peer image lookup failed", extra={"peer": peer.name, "image": name, "error": str(exc)})
            return None

    async def fetch(self, peer: Peer, digest: str, rng: ByteRange) -> bytes:
        """Bytes `rng` of `digest` from `peer`, whole, or PeerBlobError / PeerStalled."""
        stall = self._config.stall_timeout
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=stall, sock_read=None)
        headers = {"Range": rng.header()}
        buf = bytearray()
        try:
            async with self._http().get(
                peer.url(digest), headers=headers, server_hostname=peer.name, timeout=timeout
            ) as resp:
                if resp.status != 206:
                    raise PeerBlobError(f"{peer.name} answered {resp.status} for {rng.header()} of {digest}")
                if resp.content_length is not None and resp.content_length != rng.size:
                    raise PeerBlobError(f"{peer.name} announced {resp.content_length} bytes for {rng.size}")
                while len(buf) < rng.size:
                    async with asyncio.timeout(stall):
                        chunk = await resp.content.read(min(READ_CHUNK, rng.size - len(buf)))
                    if not chunk:
                        break
                    buf += chunk
        except TimeoutError as exc:
            raise PeerStalled(f"{peer.name} sent nothing of {digest} for {stall:g} s") from exc
        except aiohttp.ClientError as exc:
            raise PeerBlobError(f"{peer.name} broke off {rng.header()} of {digest}: {exc}") from exc
        if len(buf) != rng.size:
            raise PeerBlobError(f"{peer.name} sent {len(buf)} of {rng.size} bytes of {rng.header()} of {digest}")
        return bytes(buf)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
