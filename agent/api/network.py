"""Thin HTTP handlers for service addresses: publish / unpublish on this host, and list them.

A move (or the end of a migration) is `unpublish` on the old host, then `publish` on the new one,
whose container was created with the same `service_ip` (and `publish_service: false`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from aiohttp import web

from agent.api.handlers import CONTAINERS
from agent.api.responses import json_answer, optional_service
from agent.model import LABEL_SERVICE_IP, ContainerState, ContainerSummary
from agent.network import NetnsInfo, parse_service_ip
from core.errors import Conflict, ContainerNotFound, FerrymanError, InvalidRequest
from core.http.validate import check_keys, read_object, str_field
from core.ids import check_container_id


class ServiceNetworkLike(Protocol):
    def info(self, container_key: str) -> NetnsInfo: ...
    async def publish(self, service_ip: str, host_veth: str) -> None: ...
    def route_switch(
        self, service_ip: str, host_veth: str
    ) -> AbstractAsyncContextManager[Callable[[], Awaitable[None]]]: ...
    async def unpublish(self, service_ip: str) -> bool: ...
    async def uplink(self) -> str: ...
    async def routes(self) -> dict[str, str]: ...
    async def balance(self, service_ip: str, backends: list[str]) -> tuple[str, ...]: ...
    async def unbalance(self, service_ip: str) -> bool: ...
    async def balanced(self, service_ip: str) -> dict[str, object] | None: ...


NETWORK = web.AppKey("network", ServiceNetworkLike)


class NetworkUnavailable(FerrymanError):
    code = "network_unavailable"
    http_status = 503


def _network(request: web.Request) -> ServiceNetworkLike:
    return optional_service(request, NETWORK, NetworkUnavailable, "this agent has no service network")


def parse_target(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(service_ip, container) from a publish/unpublish body: exactly one of the two."""
    check_keys(body, {"service_ip", "container"}, set(), "body")
    service_ip = str_field(body, "service_ip", "body", optional=True)
    container = str_field(body, "container", "body", optional=True)
    if (service_ip is None) == (container is None):
        raise InvalidRequest("body: give exactly one of service_ip or container")
    if container is not None:
        check_container_id(container)
    return (parse_service_ip(service_ip) if service_ip is not None else None), container


async def _service_containers(request: web.Request) -> list[ContainerSummary]:
    return [c for c in await request.app[CONTAINERS].list() if c.labels.get(LABEL_SERVICE_IP)]


async def _find(request: web.Request, service_ip: str | None, container: str | None) -> ContainerSummary:
    found = [
        s for s in await _service_containers(request) if s.id == container or s.labels[LABEL_SERVICE_IP] == service_ip
    ]
    if len(found) > 1:  # a standby copy shares the address here: which one is for the caller to say
        names = ", ".join(sorted(s.id for s in found))
        raise Conflict(f"service address {service_ip} is used by containers {names} here: name the container")
    if found:
        return found[0]
    what = f"container {container}" if container is not None else f"service address {service_ip}"
    raise ContainerNotFound(f"no container with a service address matches {what} on this host")


async def publish(request: web.Request) -> web.Response:
    service_ip, container = parse_target(await read_object(request))
    network = _network(request)
    summary = await _find(request, service_ip, container)
    if summary.state in (ContainerState.CREATED, ContainerState.STOPPED):
        # Routed to a namespace nobody answers in, the address would be a black hole: the caller
        # (a chain's switch, a move) must keep it where it is served.
        raise Conflict(f"container {summary.id} is {summary.state.value}: its address is not published")
    ip = summary.labels[LABEL_SERVICE_IP]
    info = network.info(summary.id)
    await network.publish(ip, info.host_veth)
    return json_answer({"service_ip": ip, "container": summary.id, "host_veth": info.host_veth, "published": True})


async def unpublish(request: web.Request) -> web.Response:
    service_ip, container = parse_target(await read_object(request))
    network = _network(request)
    if service_ip is None:
        # By container: it must exist here. By address: works even once the container is gone.
        service_ip = (await _find(request, None, container)).labels[LABEL_SERVICE_IP]
    removed = await network.unpublish(service_ip)
    return json_answer({"service_ip": service_ip, "published": False, "was_published": removed})


async def list_services(request: web.Request) -> web.Response:
    network = _network(request)
    routes = await network.routes()
    uplink: str | None
    try:
        uplink = await network.uplink()
    except FerrymanError:
        uplink = None
    services = []
    for summary in await _service_containers(request):
        info = network.info(summary.id)
        ip = summary.labels[LABEL_SERVICE_IP]
        services.append(
            {
                "container": summary.id,
                "state": summary.state.value,
                "service_ip": ip,
                "netns": info.path,
                "host_veth": info.host_veth,
                "published": routes.get(ip) == info.host_veth,
            }
        )
    return json_answer({"uplink": uplink, "services": services, "routes": routes})


# ----- replicas behind one address: the balancer on the host that owns it (docs/deployments.md)


def _balanced_ip(request: web.Request) -> str:
    return parse_service_ip(request.match_info["service_ip"])


async def put_balancer(request: web.Request) -> web.Response:
    """Spread new connections to the address over `backends` (the list replaces the last one)."""
    ip = _balanced_ip(request)
    body = await read_object(request)
    check_keys(body, {"backends"}, {"backends"}, "body")
    backends = body["backends"]
    if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends):
        raise InvalidRequest("backends: expected a list of IPv4 addresses")
    members = await _network(request).balance(ip, backends)
    return json_answer({"service_ip": ip, "backends": list(members)})


async def get_balancer(request: web.Request) -> web.Response:
    """The backends and, from conntrack, the connections each still holds."""
    ip = _balanced_ip(request)
    found = await _network(request).balanced(ip)
    if found is None:
        raise BalancerNotFound(f"service address {ip} is not balanced on this host")
    return json_answer({"service_ip": ip, **found})


async def delete_balancer(request: web.Request) -> web.Response:
    ip = _balanced_ip(request)
    removed = await _network(request).unbalance(ip)
    return json_answer({"service_ip": ip, "was_balanced": removed})


class BalancerNotFound(FerrymanError):
    code = "balancer_not_found"
    http_status = 404


def add_routes(app: web.Application) -> None:
    app.router.add_put("/v1/network/balancers/{service_ip}", put_balancer)
    app.router.add_get("/v1/network/balancers/{service_ip}", get_balancer)
    app.router.add_delete("/v1/network/balancers/{service_ip}", delete_balancer)
    app.router.add_get("/v1/network", list_services)
    app.router.add_post("/v1/network/publish", publish)
    app.router.add_post("/v1/network/unpublish", unpublish)
