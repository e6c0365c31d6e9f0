"""ServiceNetwork: a container's service address, routed to whichever host runs it (Calico-style).

Per container with a service IP (all in the agent's host network namespace unless noted):

    <netns_dir>/fm-<hash>       the container's network namespace (the OCI spec joins it by path;
                                [network] netns_dir, /run/netns by default)
      lo up, eth0 = <service_ip>/32, default via <gateway> (link-local, on-link, permanent neighbour)
    fmv<hash>                   the host end of the veth pair; proxy_arp answers for the gateway

and, only while *published* on this host:

    <service_ip>/32 dev fmv<hash> proto 77      the route that pulls traffic in
    proxy ARP entry on the uplink                this host answers the segment's ARP for the address
    a gratuitous ARP out of the uplink           neighbours repoint their caches at once

A move is `prepare` on the new host, `hold` on the old one just before the freeze (the /32 routed
into a TUN device of the agent: the frozen copy's kernel takes nothing in, and what clients send
meanwhile is kept), `unpublish` on the old one at the decision, `publish` on the new one, then
`forward_held` on the old one sends the kept packets on to the new copy; a rollback `release`s the
hold and hands the kept packets to the resumed copy. The old host keeps its namespace and veth (a migration
source keeps its frozen copy until the commit) until `destroy`.

<hash> is derived from (this host's network namespace inode, containerd namespace, container key):
several hosts simulated in namespaces of one machine may share a netns_dir, and the same key exists on
both sides of a move.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyroute2.netlink.exceptions import NetlinkError

from agent.config import NetworkConfig
from agent.network import arp, netlink
from agent.network.addresses import hold_ifname, host_veth_name, netns_name, parse_service_ip
from agent.network.balancer import BalancerError, KernelBalancer, NftablesBalancer, check_backends
from agent.network.capture import HeldTraffic, send_packets
from agent.network.routeswitch import RouteSwitch
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

    def __init__(
        self, config: NetworkConfig | None = None, namespace: str = "default", balancer: KernelBalancer | None = None
    ):
        self._config = config or NetworkConfig()
        self._balancer: KernelBalancer = balancer or NftablesBalancer()
        self._namespace = namespace
        self._scope: str | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._announcers: dict[str, asyncio.Task[None]] = {}
        self._holds: dict[str, HeldTraffic] = {}
        self._kept: dict[str, list[bytes]] = {}
        """Packets of an address given up here, until `forward_held` sends them to its new home."""

    @property
    def config(self) -> NetworkConfig:
        return self._config

    @property
    def scope(self) -> str:
        if self._scope is None:
            # The inode of the namespace the agent runs in: stable for the host's lifetime, and
            # distinct for each simulated host sharing one netns_dir.
            self._scope = f"{Path('/proc/self/ns/net').stat().st_ino}/{self._namespace}"
        return self._scope

    def info(self, container_key: str) -> NetnsInfo:
        """The names `prepare` uses for `container_key` (pure: nothing is created)."""
        return NetnsInfo(
            path=str(Path(self._config.netns_dir, netns_name(self.scope, container_key))),
            host_veth=host_veth_name(self.scope, container_key),
        )

    async def packets_in(self, container_keys: Sequence[str]) -> dict[str, int]:
        """The packets each container has received through its veth pair since it was made (a
        counter: the host end's sent packets, read in one netlink dump); containers without a
        service address here (no veth) are left out. What the counter holds: every packet routed
        into the container (requests' segments, the ACKs of its answers, replies to connections it
        opened itself, ARP), not what was held for it during a move."""
        names = {self.info(key).host_veth: key for key in container_keys}
        if not names:
            return {}
        sent = await self._run("read the veths' packet counters", lambda: netlink.packets_sent(set(names)))
        return {names[ifname]: count for ifname, count in sent.items()}

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
        """Remove the veth pair and any hold device (and so any route through them) and the
        namespace. Idempotent."""
        info = self.info(container_key)
        device = hold_ifname(info.host_veth)
        async with self._lock(f"key:{container_key}"):
            for ip, held in list(self._holds.items()):
                if held.ifname == device:
                    del self._holds[ip]
                    held.close()
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
            kept = self._take_held(ip)  # held here until now: the copy behind host_veth gets it
            await self._run(f"publish {ip}", lambda: netlink.publish(ip, host_veth, uplink))
            await self._run(f"announce {ip} on {uplink}", lambda: arp.send_garp(uplink, ip))
            self._announcers[ip] = asyncio.create_task(self._announce_again(ip, uplink), name=f"garp {ip}")
        await self._send(ip, kept)
        log.info("service address published", extra={"service_ip": ip, "veth": host_veth, "uplink": uplink})

    @contextlib.asynccontextmanager
    async def route_switch(self, service_ip: str, host_veth: str) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """`flip`, which routes service_ip to `host_veth` in one netlink request from the event loop
        (agent/network/routeswitch.py), the veth set up and the socket opened now. A handover on
        one host flips at its switch, then calls `publish` for the rest (proxy ARP, announcement)."""
        ip = parse_service_ip(service_ip)
        async with self._lock(f"ip:{ip}"):
            try:
                switch = await RouteSwitch.open(ip, host_veth)
            except (OSError, NetlinkError) as exc:
                raise NetworkError(f"prepare the route of {ip} to {host_veth}: {exc}") from exc

            async def flip() -> None:
                try:
                    await switch.flip()
                except (OSError, NetlinkError) as exc:
                    raise NetworkError(f"route {ip} to {host_veth}: {exc}") from exc

            try:
                yield flip
            finally:
                switch.close()

    async def hold(self, service_ip: str, host_veth: str) -> bool:
        """Until `release`, `publish` or `unpublish` (see netlink.hold), what is sent to service_ip is
        kept on this host instead of reaching the container. False when it was not published to
        host_veth here (nothing to hold)."""
        ip = parse_service_ip(service_ip)
        device = hold_ifname(host_veth)
        async with self._lock(f"ip:{ip}"):
            self._stop_announcing(ip)
            self._take_held(ip)
            self._kept.pop(ip, None)
            held: HeldTraffic | None = None
            try:
                held = await self._run(f"create hold device {device}", lambda: HeldTraffic.create(ip, device))
            except NetworkError as exc:  # e.g. no /dev/net/tun: a blackhole holds as well, keeping nothing
                log.warning("held packets will not be kept", extra={"service_ip": ip, "error": str(exc)})
            capture = held.ifname if held is not None else None
            holding = False
            try:
                holding = await self._run(f"hold {ip}", lambda: netlink.hold(ip, host_veth, capture))
            finally:
                if held is not None and holding:
                    held.start(asyncio.get_running_loop())
                    self._holds[ip] = held
                elif held is not None:
                    held.close()
                    await self._run(f"delete {device}", lambda: netlink.delete_link(device))
        log.info("service address held", extra={"service_ip": ip, "held": holding})
        return holding

    async def silence(self, host_veth: str) -> None:
        """Drop whatever the container behind host_veth sends, until its address is published or
        released again (see netlink.silence)."""
        await self._run(f"silence {host_veth}", lambda: netlink.silence(host_veth))

    async def release(self, service_ip: str, host_veth: str) -> bool:
        """Route a held service_ip to host_veth again and hand it what clients sent meanwhile; False
        when it was not held here."""
        ip = parse_service_ip(service_ip)
        async with self._lock(f"ip:{ip}"):
            kept = self._take_held(ip)
            released = await self._run(f"release {ip}", lambda: netlink.release(ip, host_veth))
        if released:
            sent = await self._send(ip, kept)
            log.info("service address released", extra={"service_ip": ip, "veth": host_veth, "packets_resent": sent})
        return released

    async def unpublish(self, service_ip: str) -> bool:
        """Remove the route (namespace and veth stay). False when it was not published here. What
        clients sent while it was held waits for `forward_held`."""
        ip = parse_service_ip(service_ip)
        try:
            uplink: str | None = await self.uplink()
        except UplinkNotFound:
            uplink = None  # the route alone decides; a leftover proxy entry answers nothing without it
        async with self._lock(f"ip:{ip}"):
            self._stop_announcing(ip)  # never announce an address this host just gave up
            kept = self._take_held(ip)
            if kept:
                self._kept[ip] = kept
            removed = await self._run(f"unpublish {ip}", lambda: netlink.unpublish(ip, uplink))
        log.info(
            "service address unpublished",
            extra={"service_ip": ip, "was_published": removed, "packets_kept": len(kept)},
        )
        return removed

    async def forward_held(self, service_ip: str) -> int:
        """Send what clients sent to service_ip while it was held here to wherever it is routed now
        (call once its new home has published it). The number of packets sent."""
        ip = parse_service_ip(service_ip)
        return await self._send(ip, self._kept.pop(ip, []))

    async def _send(self, ip: str, packets: list[bytes]) -> int:
        if not packets:
            return 0
        try:
            return await asyncio.to_thread(send_packets, packets)
        except OSError as exc:  # best effort: the clients retransmit, only later
            log.warning("resending held packets failed", extra={"service_ip": ip, "error": str(exc)})
            return 0

    def _take_held(self, ip: str) -> list[bytes]:
        """Stop keeping packets for ip; those kept so far. The device goes with the route change
        that follows (netlink deletes it)."""
        held = self._holds.pop(ip, None)
        if held is None:
            return []
        kept = held.take()
        held.close()
        if held.dropped:
            log.warning("held packets over budget", extra={"service_ip": ip, "dropped": held.dropped})
        return kept

    async def published(self, service_ip: str) -> str | None:
        """The host veth service_ip is routed to on this host, HELD ("") while held, or None."""
        ip = parse_service_ip(service_ip)
        return await self._run(f"look up {ip}", lambda: netlink.published_interface(ip))

    async def routes(self) -> dict[str, str]:
        """{service IP: host veth} for everything published on this host."""
        return await self._run("list service routes", netlink.published_routes)

    # ----- replicas behind one address (agent/network/balancer.py)

    async def _balance_step(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except (OSError, NetlinkError, BalancerError) as exc:
            raise NetworkError(f"{what}: {exc}") from exc

    async def balance(self, service_ip: str, backends: list[str]) -> tuple[str, ...]:
        """Spread new connections to service_ip over `backends` (replaces the previous list; the
        established connections stay where they are)."""
        ip = parse_service_ip(service_ip)
        members = check_backends(ip, backends)
        uplink = await self.uplink()
        async with self._lock(f"ip:{ip}"):
            await self._balance_step(f"no redirects on {uplink}", lambda: netlink.no_redirects(uplink))
            await self._balance_step(f"balance {ip}", lambda: self._balancer.apply(ip, members, uplink))
        log.info("service address balanced", extra={"service_ip": ip, "backends": list(members)})
        return members

    async def unbalance(self, service_ip: str) -> bool:
        """Stop balancing service_ip (new connections go to the address itself again). False when
        it was not balanced here."""
        ip = parse_service_ip(service_ip)
        async with self._lock(f"ip:{ip}"):
            removed = await self._balance_step(f"unbalance {ip}", lambda: self._balancer.remove(ip))
        log.info("service address no longer balanced", extra={"service_ip": ip, "was_balanced": removed})
        return removed

    async def balanced(self, service_ip: str) -> dict[str, object] | None:
        """{"backends": [...], "balanced": connections spread since the table was made,
        "connections": {backend: open connections}}, or None when service_ip is not balanced here."""
        ip = parse_service_ip(service_ip)
        found = await self._balance_step(f"read the balancer of {ip}", lambda: self._balancer.read(ip))
        if found is None:
            return None
        backends, balanced = found
        connections = await self._balance_step(f"count connections to {ip}", lambda: self._balancer.connections(ip))
        return {"backends": list(backends), "balanced": balanced, "connections": connections}

    async def close(self) -> None:
        for ip in list(self._announcers):
            self._stop_announcing(ip)
        for ip in list(self._holds):  # the devices stay (persistent): the routes keep the holds
            self._holds.pop(ip).close()
        self._kept.clear()

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
