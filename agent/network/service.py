"""ServiceNetwork: a container's service address, routed to whichever host runs it (Calico-style).

Per container with a service IP (all in the agent's host network namespace unless noted):

    /run/netns/fm-<hash>        the container's network namespace (the OCI spec joins it by path)
      lo up, eth0 = <service_ip>/32, default via <gateway> (link-local, on-link, permanent neighbour)
    fmv<hash>                   the host end of the veth pair; proxy_arp answers for the gateway

and, only while *published* on this host:

    <service_ip>/32 dev fmv<hash> proto 77      the route that pulls traffic in
    proxy ARP entry on the uplink                this host answers the segment's ARP for the address
    a gratuitous ARP out of the uplink           neighbours repoint their caches at once

A move is `prepare` on the new host, `hold` on the old one just before the freeze (a blackhole /32:
the frozen copy's kernel takes nothing in), `unpublish` on the old one at the decision, `publish` on
the new one; a rollback `release`s the hold. The old host keeps its namespace and veth (a migration
source keeps its frozen copy until the commit) until `destroy`.

<hash> is derived from (this host's network namespace inode, containerd namespace, container key):
several hosts simulated in namespaces of one machine share /run/netns, and the same key exists on
both sides of a move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyroute2.netlink.exceptions import NetlinkError

from agent.config import NetworkConfig
from agent.network import arp, netlink
from agent.network.addresses import NETNS_DIR, host_veth_name, netns_name, parse_service_ip
from core.errors import FerrymanError

log = logging.getLogger(__name__)

T = TypeVar("T")

ANNOUNCE_REPEATS = (0.2, 1.0)
"""Seconds after a publish at which the gratuitous ARP is sent again (a lost first frame, or a
neighbour that was mid-resolution, still converges within about a second)."""


class NetworkError(FerrymanError):
    """A netlink, namespace or sysctl step failed."""

    code = "network_error"
    http_status = 500


class UplinkNotFound(NetworkError):
    code = "uplink_not_found"
    http_status = 503


@dataclass(frozen=True)
class NetnsInfo:
    path: str
    """The bind-mounted network namespace (the OCI spec's linux.namespaces[network].path)."""
    host_veth: str
    """The host end of the container's veth pair, in the agent's network namespace."""


class ServiceNetwork:
    """Async adapter over the blocking netlink steps; safe to call concurrently."""

    def __init__(self, config: NetworkConfig | None = None, namespace: str = "default", netns_dir: str = NETNS_DIR):
        self._config = config or NetworkConfig()
        self._namespace = namespace
        self._netns_dir = netns_dir
        self._scope: str | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._announcers: dict[str, asyncio.Task[None]] = {}

    @property
    def config(self) -> NetworkConfig:
        return self._config

    @property
    def scope(self) -> str:
        if self._scope is None:
            # The inode of the namespace the agent runs in: stable for the host's lifetime, and
            # distinct for each simulated host sharing one /run/netns.
            self._scope = f"{Path('/proc/self/ns/net').stat().st_ino}/{self._namespace}"
        return self._scope

    def info(self, container_key: str) -> NetnsInfo:
        """The names `prepare` uses for `container_key` (pure: nothing is created)."""
        return NetnsInfo(
            path=str(Path(self._netns_dir, netns_name(self.scope, container_key))),
            host_veth=host_veth_name(self.scope, container_key),
        )

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except (OSError, NetlinkError) as exc:
            raise NetworkError(f"{what}: {exc}") from exc

    async def prepare(self, container_key: str, service_ip: str) -> NetnsInfo:
        """Create (or repair) the container's namespace, veth pair and addressing. Idempotent; publishes nothing."""
        ip = parse_service_ip(service_ip)
        info = self.info(container_key)
        gateway = self._config.link_local_gateway
        mtu = await self._uplink_mtu()
        async with self._lock(f"key:{container_key}"):
            await self._run(
                f"prepare network for {container_key}",
                lambda: netlink.prepare(info.path, info.host_veth, ip, gateway, mtu),
            )
        log.info(
            "container network ready",
            extra={"container": container_key, "service_ip": ip, "netns": info.path, "veth": info.host_veth},
        )
        return info

    async def destroy(self, container_key: str) -> None:
        """Remove the veth pair (and so any route through it) and the namespace. Idempotent."""
        info = self.info(container_key)
        async with self._lock(f"key:{container_key}"):
            await self._run(f"destroy network of {container_key}", lambda: netlink.destroy(info.path, info.host_veth))
        log.info("container network removed", extra={"container": container_key, "netns": info.path})

    async def uplink(self) -> str:
        """The configured uplink, else the interface of the IPv4 default route."""
        if self._config.uplink:
            return self._config.uplink
        found = await self._run("find the default route", netlink.default_route_interface)
        if found is None:
            raise UplinkNotFound("no IPv4 default route to pick the uplink from; set [network] uplink")
        return found

    async def _uplink_mtu(self) -> int | None:
        """The uplink's MTU for the veth pair; None (the veth default) when there is no uplink yet."""
        try:
            uplink = await self.uplink()
        except UplinkNotFound:
            return None
        return await self._run(f"read the MTU of {uplink}", lambda: netlink.link_mtu(uplink))

    async def publish(self, service_ip: str, host_veth: str) -> None:
        """Route service_ip to `host_veth` here, answer ARP for it on the uplink, and announce it."""
        ip = parse_service_ip(service_ip)
        uplink = await self.uplink()
        async with self._lock(f"ip:{ip}"):
            self._stop_announcing(ip)
            await self._run(f"publish {ip}", lambda: netlink.publish(ip, host_veth, uplink))
            await self._run(f"announce {ip} on {uplink}", lambda: arp.send_garp(uplink, ip))
            self._announcers[ip] = asyncio.create_task(self._announce_again(ip, uplink), name=f"garp {ip}")
        log.info("service address published", extra={"service_ip": ip, "veth": host_veth, "uplink": uplink})

    async def hold(self, service_ip: str, host_veth: str) -> bool:
        """Silence the container until `release`, `publish` or `unpublish` (see netlink.hold): what is
        sent to service_ip is dropped on this host, and what the container sends dropped at its own
        interface. False when it was not published to host_veth here (nothing to hold)."""
        ip = parse_service_ip(service_ip)
        async with self._lock(f"ip:{ip}"):
            self._stop_announcing(ip)
            held = await self._run(f"hold {ip}", lambda: netlink.hold(ip, host_veth))
        log.info("service address held", extra={"service_ip": ip, "held": held})
        return held

    async def release(self, service_ip: str, host_veth: str) -> bool:
        """Route a held service_ip to host_veth again; False when it was not held here."""
        ip = parse_service_ip(service_ip)
        async with self._lock(f"ip:{ip}"):
            released = await self._run(f"release {ip}", lambda: netlink.release(ip, host_veth))
        if released:
            log.info("service address released", extra={"service_ip": ip, "veth": host_veth})
        return released

    async def unpublish(self, service_ip: str) -> bool:
        """Remove the route (namespace and veth stay). False when it was not published here."""
        ip = parse_service_ip(service_ip)
        try:
            uplink: str | None = await self.uplink()
        except UplinkNotFound:
            uplink = None  # the route alone decides; a leftover proxy entry answers nothing without it
        async with self._lock(f"ip:{ip}"):
            self._stop_announcing(ip)  # never announce an address this host just gave up
            removed = await self._run(f"unpublish {ip}", lambda: netlink.unpublish(ip, uplink))
        log.info("service address unpublished", extra={"service_ip": ip, "was_published": removed})
        return removed

    async def published(self, service_ip: str) -> str | None:
        """The host veth service_ip is routed to on this host, HELD ("") while held, or None."""
        ip = parse_service_ip(service_ip)
        return await self._run(f"look up {ip}", lambda: netlink.published_interface(ip))

    async def routes(self) -> dict[str, str]:
        """{service IP: host veth} for everything published on this host."""
        return await self._run("list service routes", netlink.published_routes)

    async def close(self) -> None:
        for ip in list(self._announcers):
            self._stop_announcing(ip)

    def _stop_announcing(self, ip: str) -> None:
        task = self._announcers.pop(ip, None)
        if task is not None:
            task.cancel()

    async def _announce_again(self, ip: str, uplink: str) -> None:
        elapsed = 0.0
        for at in ANNOUNCE_REPEATS:
            await asyncio.sleep(at - elapsed)
            elapsed = at
            # Under the address's lock: an unpublish waits for a send in flight, so no announcement
            # from this host can follow its unpublish (and undo the new host's).
            async with self._lock(f"ip:{ip}"):
                if self._announcers.get(ip) is not asyncio.current_task():
                    return
                with contextlib.suppress(OSError):  # best effort: the first announcement already went out
                    await asyncio.to_thread(arp.send_garp, uplink, ip)
        if self._announcers.get(ip) is asyncio.current_task():
            del self._announcers[ip]
