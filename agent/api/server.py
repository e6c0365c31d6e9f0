"""Building the aiohttp application and serving it on a unix socket or a TCP port."""

from __future__ import annotations

import asyncio
import logging
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from aiohttp import web

from agent.api import cache as c
from agent.api import componentmetrics as cm
from agent.api import compositions as comp
from agent.api import handlers as h
from agent.api import health as hc
from agent.api import migrations as m
from agent.api import network as n
from agent.api import reservations as r
from agent.api import stagestate as st
from agent.api.tls import ops_only_middleware, parse_tls_listen
from agent.metrics import AgentMetrics
from core.errors import ConfigError
from core.http.access_log import JsonAccessLogger
from core.http.errors import error_middleware
from core.http.runner import ApiRunner
from core.http.validate import MAX_BODY_BYTES
from core.security.pki import Role
from core.security.reload import TlsContexts
from core.security.tls import TlsFiles

log = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
SHUTDOWN_TIMEOUT = 10.0
"""Seconds in-flight requests get to finish when the server stops."""


class AgentLike(Protocol):
    """What the API needs from the agent: its services and its metrics.

    Optionally also `migrations` (an `agent.api.migrations.MigrationServiceLike`): without it the
    migration routes answer 503 `migrations_unavailable`. It is read with getattr, because a
    protocol member cannot be optional.
    """

    @property
    def images(self) -> h.ImageServiceLike: ...
    @property
    def containers(self) -> h.ContainerServiceLike: ...
    @property
    def metrics(self) -> AgentMetrics: ...


def build_app(agent: AgentLike) -> web.Application:
    # Outermost first: the ops check's refusal leaves as the usual error JSON.
    app = web.Application(middlewares=[error_middleware, ops_only_middleware], client_max_size=MAX_BODY_BYTES)
    app[h.IMAGES] = agent.images
    app[h.CONTAINERS] = agent.containers
    app[h.METRICS] = agent.metrics
    migrations: m.MigrationServiceLike | None = getattr(agent, "migrations", None)
    if migrations is not None:
        app[m.MIGRATIONS] = migrations
    # The service network lives on the container service (or the agent); without it: 503.
    network: n.ServiceNetworkLike | None = getattr(agent, "network", None) or getattr(agent.containers, "network", None)
    if network is not None:
        app[n.NETWORK] = network
    # Coordinator reservations (agent/reservations.py); without them: 503.
    reservations: r.ReservationsLike | None = getattr(agent, "reservations", None)
    if reservations is not None:
        app[r.RESERVATIONS] = reservations
    # The layer cache (agent/cache); without it: 503.
    cache: c.CacheLike | None = getattr(agent, "cache", None)
    if cache is not None:
        app[c.CACHE] = cache
    # Containers' health checks (agent/health); without them: 503.
    health: hc.HealthLike | None = getattr(agent, "health", None)
    if health is not None:
        app[hc.HEALTH] = health
    # Composition manifests (agent/composition); without them: 503.
    assembly: comp.AssemblyLike | None = getattr(agent, "assembly", None)
    if assembly is not None:
        app[comp.ASSEMBLY] = assembly
    app[h.OPENAPI] = OPENAPI_PATH.read_bytes()
    app[h.SHUTDOWN] = asyncio.Event()

    async def _on_shutdown(app: web.Application) -> None:
        app[h.SHUTDOWN].set()

    app.on_shutdown.append(_on_shutdown)
    app.router.add_post("/v1/images/pull", h.pull_image)
    app.router.add_get("/v1/images", h.list_images)
    app.router.add_post("/v1/images/import", h.import_image)
    app.router.add_get("/v1/images/export", h.export_image)
    # Image names contain '/' and ':' (registry/repo:tag), so the name takes the rest of the path.
    app.router.add_delete("/v1/images/{name:.+}", h.remove_image)
    app.router.add_post("/v1/containers", h.create_container)
    app.router.add_get("/v1/containers", h.list_containers)
    app.router.add_get("/v1/containers/{id}", h.inspect_container)
    app.router.add_delete("/v1/containers/{id}", h.delete_container)
    app.router.add_delete("/v1/volumes/{name}", h.delete_volume)
    app.router.add_post("/v1/containers/{id}/start", h.start_container)
    app.router.add_post("/v1/containers/{id}/stop", h.stop_container)
    app.router.add_post("/v1/containers/{id}/freeze", h.freeze_container)
    app.router.add_post("/v1/containers/{id}/thaw", h.thaw_container)
    app.router.add_post("/v1/containers/{id}/checkpoint", h.checkpoint_container)
    app.router.add_post("/v1/containers/{id}/restore", h.restore_container)
    app.router.add_get("/v1/containers/{id}/logs", h.container_logs)
    app.router.add_post("/v1/migrations", m.start_migration)
    app.router.add_get("/v1/migrations", m.list_migrations)
    app.router.add_get("/v1/migrations/{id}", m.get_migration)
    app.router.add_get("/v1/migrations/{id}/events", m.migration_events)
    n.add_routes(app)
    r.add_routes(app)
    c.add_routes(app)
    hc.add_routes(app)
    st.add_routes(app)
    comp.add_routes(app)
    cm.add_routes(app)
    app.router.add_get("/healthz", h.healthz)
    # The migrations module's /metrics refreshes its gauge, then serves the usual scrape.
    app.router.add_get("/metrics", m.metrics)
    app.router.add_get("/openapi.yaml", h.openapi)
    return app


@dataclass(frozen=True)
class UnixAddress:
    path: str


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int


def parse_listen(listen: str) -> UnixAddress | TcpAddress:
    """Parse `unix:///path` or `tcp://host:port` (IPv6 hosts in brackets); ConfigError otherwise."""
    parts = urlsplit(listen)
    if parts.scheme == "unix":
        path = parts.netloc + parts.path  # tolerate unix://relative, though absolute is meant
        if not path.startswith("/"):
            raise ConfigError(f"listen address {listen!r}: a unix socket path must be absolute")
        return UnixAddress(path)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"listen address {listen!r}: {exc}") from exc
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ConfigError(f"listen address {listen!r}: expected tcp://host:port")
        return TcpAddress(parts.hostname, port)
    raise ConfigError(f"listen address {listen!r}: expected unix:///path or tcp://host:port")


def _prepare_unix_path(path: Path) -> None:
    """Make the parent directory and clear a stale socket, without stealing a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody answers: left behind by a dead agent
            return
    raise ConfigError(f"{path} is in use by another process (is an agent already running?)")


class ApiServer:
    """A started API server; `close()` stops accepting, ends streams and finishes in-flight requests."""

    def __init__(
        self, runner: web.AppRunner, address: UnixAddress | TcpAddress, tls_site: web.TCPSite | None = None
    ) -> None:
        self.runner = runner
        self.address = address
        self.tls_site = tls_site

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """(host, port) of the ops mTLS listener, with the real port when 0 was asked for; None without one."""
        server = getattr(self.tls_site, "_server", None)  # aiohttp exposes the bound port nowhere else
        sockets = getattr(server, "sockets", None) or []
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            return host, port
        return None

    @property
    def url(self) -> str:
        """The address a client should use, with the real port when tcp port 0 was asked for."""
        if isinstance(self.address, UnixAddress):
            return f"unix://{self.address.path}"
        for addr in self.runner.addresses:
            host, port = addr[0], addr[1]
            return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        return f"tcp://{self.address.host}:{self.address.port}"

    async def close(self) -> None:
        await self.runner.cleanup()
        if isinstance(self.address, UnixAddress):
            # aiohttp leaves the socket file behind; remove it so the next start finds a clean path.
            await asyncio.to_thread(Path(self.address.path).unlink, missing_ok=True)


async def serve(
    app: web.Application,
    listen: str,
    tls_listen: str = "",
    tls: TlsFiles | None = None,
    contexts: TlsContexts | None = None,
) -> ApiServer:
    """Start serving `app` on `listen` (unix:///path or tcp://host:port), and on `tls_listen`
    (host:port, optional) over mutual TLS with the fleet CA, where only ops certificates get in.
    The TLS context comes from `contexts` (so SIGHUP reloads it) when given."""
    address = parse_listen(listen)
    tls_address = parse_tls_listen(tls_listen)
    ssl_context = None
    if tls_address is not None:
        if tls is None:
            raise ConfigError("api.tls_listen is set but no TLS files were given")
        contexts = contexts if contexts is not None else TlsContexts()
        ssl_context = contexts.server(tls, Role.AGENT)  # TlsConfigError (a ConfigError) before anything listens
    runner = ApiRunner(
        app,
        handle_signals=False,  # the daemon owns signal handling
        access_log_class=JsonAccessLogger,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    try:
        site: web.BaseSite
        if isinstance(address, UnixAddress):
            path = Path(address.path)
            await asyncio.to_thread(_prepare_unix_path, path)
            site = web.UnixSite(runner, str(path))
            await site.start()
            # Owner and group only: the socket controls containers on this host.
            await asyncio.to_thread(path.chmod, 0o660)
        else:
            site = web.TCPSite(runner, address.host, address.port)
            await site.start()
        tls_site = None
        if tls_address is not None:
            tls_site = web.TCPSite(runner, tls_address[0], tls_address[1], ssl_context=ssl_context)
            await tls_site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = ApiServer(runner, address, tls_site)
    log.info("api listening", extra={"listen": server.url, "tls_listen": tls_listen or None})
    return server
