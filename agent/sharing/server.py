"""The blob server: `GET`/`HEAD /v1/blobs/{digest}` over HTTPS, for agent certificates of the fleet CA.

The handshake refuses a client without a fleet certificate (core.security.tls.server_context); the
middleware then refuses any role but `agent` (an ops certificate drives agents through their API,
it has no business reading their content). A response carries the blob's size and the bytes this
host can serve now (`X-Ferryman-Size`, `X-Ferryman-Available`: less than the size while this host is
itself still pulling the blob). `GET` honours one `Range` (206 + Content-Range): a range past the
bytes available is served as they arrive, the store failing it if they stop (the receiver abandons a
stalled range and checks the whole blob's digest anyway). Uploads are limited at once, per peer and
in bytes per second ([sharing]).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler

from agent.config import SharingConfig
from agent.oci import parse_digest
from agent.peers.port import NO_FAILPOINTS, FailpointActions
from agent.sharing.errors import BlobNotHeld
from agent.sharing.throttle import RateLimit
from core.errors import FerrymanError, InvalidRequest
from core.security.pki import Role
from core.security.reload import TlsContexts
from core.security.tls import PeerIdentityError, TlsFiles, parse_peer_listen, peer_identity, peer_role

log = logging.getLogger(__name__)

SIZE = "X-Ferryman-Size"
AVAILABLE = "X-Ferryman-Available"
PEER: web.RequestKey[str] = web.RequestKey("peer", str)
"""The verified host name of the peer asking (its certificate's)."""
SHUTDOWN_TIMEOUT = 2.0
"""Seconds uploads get to finish when the agent stops: a peer takes the rest elsewhere."""


@dataclass(frozen=True)
class BlobState:
    """What this host can serve of one blob."""

    size: int
    available: int
    """Bytes readable now: `size` once committed, fewer while the blob is still being pulled."""

    @property
    def complete(self) -> bool:
        return self.available >= self.size


@dataclass(frozen=True)
class ImageTarget:
    """What an image name points at on a peer (its index or manifest): the start of a pull from peers
    when the registry cannot be reached. Everything below it is checked by digest as usual; the name
    itself is the peer's word, taken from fleet hosts only."""

    digest: str
    media_type: str
    size: int


class BlobStore(Protocol):
    """The blobs this host can serve (agent/images/shared.py)."""

    async def image(self, name: str) -> ImageTarget | None:
        """What image `name` points at here; None when there is no such image."""
        ...

    async def state(self, digest: str) -> BlobState | None:
        """None: neither held nor being pulled here."""
        ...

    def read(self, digest: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end), waiting for a blob still being pulled to grow; BlobNotHeld when it goes,
        PeerStalled (or any FerrymanError) when it stops growing."""
        ...


@web.middleware
async def agents_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    if ssl_object is None:
        raise web.HTTPForbidden(text="blobs are served over mutual TLS only")
    try:
        role, who = peer_role(ssl_object), peer_identity(ssl_object)
    except PeerIdentityError as exc:
        raise web.HTTPForbidden(text=exc.message) from exc
    if role is not Role.AGENT:
        log.warning("refused a blob request", extra={"peer": who, "role": role.value})
        raise web.HTTPForbidden(text=f"{who} has role {role.value}; blobs are served to agents only")
    request[PEER] = who
    return await handler(request)


class BlobServer:
    """The HTTPS listener on `[sharing] listen`, with its upload limits.

    Fault tests' failpoints: `sharing.serve=corrupt` flips a byte of every chunk served,
    `sharing.serve=stall` stops after the first chunk of each range."""

    def __init__(
        self,
        store: BlobStore,
        config: SharingConfig,
        tls: TlsFiles,
        failpoints: FailpointActions | None = None,
        on_sent: Callable[[int], None] = lambda n: None,
        contexts: TlsContexts | None = None,
    ) -> None:
        self.config = config
        self._contexts = contexts if contexts is not None else TlsContexts()
        self._on_sent = on_sent
        self._failpoints = failpoints or NO_FAILPOINTS
        self._tls = tls
        self._store = store
        self._total = asyncio.Semaphore(config.max_uploads)
        self._per_peer: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(config.max_uploads_per_peer)
        )
        self._rate = RateLimit(config.upload_rate)
        self._runner: web.AppRunner | None = None
        self.bytes_served = 0
        self.port = 0
        """The bound port once started (the configured one, or the one picked for port 0)."""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[agents_only])
        app.router.add_route("GET", "/v1/blobs/{digest}", self._get)
        app.router.add_route("HEAD", "/v1/blobs/{digest}", self._get)
        app.router.add_route("GET", "/v1/images", self._image)
        return app

    async def start(self) -> None:
        listen = parse_peer_listen(self.config.listen)
        if listen is None:
            return
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        site = web.TCPSite(self._runner, listen[0], listen[1], ssl_context=self._contexts.server(self._tls), backlog=64)
        await site.start()
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else listen[1]
        log.info("blob server ready", extra={"listen": self.config.listen})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _image(self, request: web.Request) -> web.StreamResponse:
        target = await self._store.image(request.query.get("name", ""))
        if target is None:
            raise web.HTTPNotFound(text="no such image here")
        return web.json_response({"digest": target.digest, "media_type": target.media_type, "size": target.size})

    async def _get(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        try:
            parse_digest(digest)
        except FerrymanError as exc:
            raise web.HTTPBadRequest(text=exc.message) from exc
        state = await self._store.state(digest)
        if state is None:
            raise web.HTTPNotFound(text=f"{digest} is not held here")
        headers = {SIZE: str(state.size), AVAILABLE: str(state.available), "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(state.size)})
        try:
            start, end = _requested(request, state.size)
        except InvalidRequest as exc:
            raise web.HTTPRequestRangeNotSatisfiable(
                text=exc.message, headers={"Content-Range": f"bytes */{state.size}"}
            ) from exc
        peer = request[PEER]
        async with self._total, self._per_peer[peer]:
            status = 206 if "Range" in request.headers else 200
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = end - start
            if status == 206:
                resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{state.size}"
            await resp.prepare(request)
            fault = self._failpoints.action("sharing.serve")
            sent = 0
            try:
                async for chunk in self._store.read(digest, start, end):
                    if fault == "corrupt":
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    elif fault == "stall" and sent:
                        await asyncio.Event().wait()  # until the receiver gives up and closes
                    await self._rate.spend(len(chunk))
                    await resp.write(chunk)
                    sent += len(chunk)
                    self.bytes_served += len(chunk)
                    self._on_sent(len(chunk))
            except (BlobNotHeld, FerrymanError, OSError) as exc:
                # The status line is out: the receiver sees a short body and takes the range elsewhere.
                log.info("blob upload broke", extra={"peer": peer, "digest": digest, "error": str(exc)})
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write_eof()
            return resp


def _requested(request: web.Request, size: int) -> tuple[int, int]:
    """[start, end) of the request's Range (aiohttp parses it), the whole blob without one."""
    try:
        rng = request.http_range
    except ValueError as exc:
        raise InvalidRequest(f"bad Range header: {exc}") from exc
    start, stop = rng.start, rng.stop
    if start is None:
        start = 0
    elif start < 0:  # a suffix: the last -start bytes
        start = max(size + start, 0)
    end = size if stop is None else min(stop, size)
    if not 0 <= start < end:
        raise InvalidRequest(f"range {request.headers.get('Range')!r} outside a blob of {size} bytes")
    return start, end
