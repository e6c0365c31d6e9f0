"""Building the coordinator's aiohttp application and serving it over TLS.

Client certificates are *optional* at the TLS layer (an ops client may use a bearer token instead),
but any certificate presented must verify against the fleet CA, or the handshake fails. Whether the
caller may do what it asks is decided per route (coordinator/auth.py).
"""

from __future__ import annotations

import logging
import ssl
import weakref
from pathlib import Path

from aiohttp import web

from coordinator.api import handlers as h
from coordinator.app import Coordinator
from coordinator.wire import MAX_BODY_BYTES
from core.http.access_log import JsonAccessLogger
from core.http.errors import error_middleware
from core.http.runner import ApiRunner

log = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
SHUTDOWN_TIMEOUT = 10.0


def build_app(coordinator: Coordinator) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, h.auth_middleware, h.leader_middleware], client_max_size=MAX_BODY_BYTES
    )
    app[h.COORDINATOR] = coordinator
    app[h.PEERS] = weakref.WeakKeyDictionary()
    app[h.SESSIONS] = weakref.WeakSet()
    app.on_shutdown.append(h.close_sessions)
    app[h.OPENAPI] = OPENAPI_PATH.read_bytes()
    r = app.router
    r.add_post("/v1/register", h.register)
    r.add_post("/v1/telemetry", h.telemetry)
    r.add_get("/v1/telemetry/stream", h.telemetry_stream)
    r.add_post("/v1/layers/announce", h.announce_layers)
    r.add_post("/v1/layers/holders", h.layer_holders)
    r.add_post("/v1/registry/events", h.registry_events)
    r.add_get("/v1/hosts", h.list_hosts)
    r.add_get("/v1/hosts/{host}", h.get_host)
    r.add_post("/v1/hosts/{host}/drain", h.drain_host)
    r.add_post("/v1/hosts/{host}/uncordon", h.uncordon_host)
    r.add_post("/v1/migrations", h.start_migration)
    r.add_get("/v1/migrations", h.list_migrations)
    r.add_get("/v1/migrations/{id}", h.get_migration)
    r.add_get("/v1/predictions", h.list_predictions)
    r.add_get("/v1/predictions/{host}", h.explain_prediction)
    r.add_get("/v1/decisions", h.list_decisions)
    r.add_get("/v1/model", h.get_model)
    r.add_post("/v1/model", h.activate_model)
    r.add_post("/v1/model/rollback", h.rollback_model)
    r.add_post("/v1/model/retrain", h.retrain_model)
    r.add_get("/v1/reservations", h.list_reservations)
    r.add_post("/v1/reservations", h.place_reservation)
    r.add_delete("/v1/reservations/{id}", h.release_reservation)
    r.add_post("/v1/placements", h.place_start)
    r.add_post("/v1/containers", h.start_container)
    r.add_get("/v1/catalog", h.list_catalog)
    r.add_post("/v1/catalog", h.register_catalog_entry)
    r.add_get("/v1/catalog/{name}", h.show_catalog_name)
    r.add_delete("/v1/catalog/{name}", h.remove_catalog_name)
    r.add_get("/v1/catalog/{name}/versions/{version}", h.show_catalog_entry)
    r.add_delete("/v1/catalog/{name}/versions/{version}", h.remove_catalog_entry)
    r.add_get("/v1/catalog/{name}/plan", h.plan_catalog_entry)
    r.add_get("/v1/schemas/catalog-entry.json", h.catalog_schema)
    r.add_post("/v1/deployments", h.create_deployment)
    r.add_get("/v1/deployments", h.list_deployments)
    r.add_get("/v1/deployments/{id}", h.get_deployment)
    r.add_delete("/v1/deployments/{id}", h.delete_deployment)
    r.add_post("/v1/deployments/{id}/components/{name}/scale", h.scale_component)
    r.add_get("/v1/deployments/{id}/components/{name}/behaviour", h.component_behaviour)
    r.add_get("/v1/scaling/{id}", h.scaling_status)
    r.add_get("/v1/scaling/{id}/history", h.scaling_history)
    r.add_put("/v1/scaling/{id}/policy", h.set_scaling_policy)
    r.add_get("/v1/scaling/{id}/explain", h.explain_scaling)
    r.add_get("/v1/chains/schema", h.chain_schema)
    r.add_post("/v1/chains", h.run_chain)
    r.add_get("/v1/chains", h.list_chains)
    r.add_get("/v1/chains/{id}", h.get_chain)
    r.add_post("/v1/chains/{id}/advance", h.advance_chain)
    r.add_post("/v1/chains/{id}/abort", h.abort_chain)
    r.add_get("/v1/openapi.yaml", h.openapi)
    r.add_get("/healthz", h.healthz)
    r.add_get("/metrics", h.metrics)
    return app


def tls_context(coordinator: Coordinator) -> ssl.SSLContext:
    ctx = coordinator.tls_contexts.server(coordinator.config.tls)
    ctx.verify_mode = ssl.CERT_OPTIONAL  # a presented certificate is still fully verified
    return ctx


class CoordinatorServer:
    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner

    @property
    def url(self) -> str:
        for addr in self.runner.addresses:
            host, port = addr[0], addr[1]
            return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return ""

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(coordinator: Coordinator) -> CoordinatorServer:
    host, port = coordinator.config.listen_address
    runner = ApiRunner(
        build_app(coordinator),
        handle_signals=False,
        access_log_class=JsonAccessLogger,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=tls_context(coordinator))
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = CoordinatorServer(runner)
    log.info("coordinator api listening", extra={"url": server.url})
    return server
