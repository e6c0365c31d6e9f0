"""Blocking netlink and sysctl steps behind `ServiceNetwork` (pyroute2's sync API).

Every function here blocks and runs in a worker thread: host-side steps in the agent's own network
namespace (pool threads never leave it), container-side steps through `nsutil.call_in_netns`.
/proc/sys/net resolves to the calling thread's namespace, so sysctls follow the same rule.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_PROXY

from agent.network import nsutil
from agent.network.addresses import CONTAINER_IFNAME, HOLD_PREFIX, hold_ifname

RTPROT_FERRYMAN = 77
"""Routing protocol id marking our /32 service routes (`ip route show proto 77`): unpublish never
removes a route someone else installed."""
RT_TABLE_MAIN = 254
RTN_BLACKHOLE = 6
HELD = ""
"""What `published_routes` names as the interface of an address that is held (into a hold device,
or a blackhole route, which has none)."""
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
NUD_PERMANENT = 0x80
IFF_UP = 0x1


def _write_sysctl(path: str, value: str) -> None:
    target = Path("/proc/sys/net", path)
    if target.read_text().strip() != value:  # skip writes that change nothing
        target.write_text(value)


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _link(ipr: IPRoute, index: int) -> Any:
    return ipr.link("get", index=index)[0]


def _peer_index(link: Any) -> int | None:
    peer = link.get_attr("IFLA_LINK")
    return int(peer) if peer is not None else None


def _is_veth(link: Any) -> bool:
    info = link.get_attr("IFLA_LINKINFO")
    return info is not None and info.get_attr("IFLA_INFO_KIND") == "veth"


def _mac(link: Any) -> str:
    return str(link.get_attr("IFLA_ADDRESS"))


# ----- the container side (run inside the container's namespace) ---------------------------------------


def _container_eth0() -> tuple[int, int | None] | None:
    """(index, peer index) of the container's eth0 if it is a veth, else None (removing a non-veth one)."""
    with IPRoute() as ipr:
        index = _index(ipr, CONTAINER_IFNAME)
        if index is None:
            return None
        link = _link(ipr, index)
        if not _is_veth(link):
            ipr.link("del", index=index)
            return None
        return index, _peer_index(link)


def _delete_container_eth0() -> None:
    with IPRoute() as ipr:
        index = _index(ipr, CONTAINER_IFNAME)
        if index is not None:
            ipr.link("del", index=index)


def _configure_container(service_ip: str, gateway: str, gateway_mac: str, mtu: int | None) -> None:
    with IPRoute() as ipr:
        lo = _index(ipr, "lo")
        if lo is not None:
            ipr.link("set", index=lo, state="up")
        index = _index(ipr, CONTAINER_IFNAME)
        if index is None:
            raise OSError(errno.ENODEV, f"{CONTAINER_IFNAME} vanished from the container namespace")
        if mtu is not None:
            ipr.link("set", index=index, mtu=mtu)
        ipr.link("set", index=index, state="up")
        have = False
        for addr in ipr.get_addr(family=socket.AF_INET, index=index):
            text, plen = addr.get_attr("IFA_ADDRESS"), addr["prefixlen"]
            if text == service_ip and plen == 32:
                have = True
            else:  # a re-prepare with another service IP replaces the old one
                ipr.addr("del", index=index, address=text, prefixlen=plen)
        if not have:
            ipr.addr("add", index=index, address=service_ip, prefixlen=32)
        # The gateway is link-local and on-link: a /32 link route, a default via it, and a permanent
        # neighbour entry (so the container never waits on ARP; proxy_arp on the host end answers anyway).
        ipr.route("replace", dst=f"{gateway}/32", oif=index, scope=RT_SCOPE_LINK)
        ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=index)
        ipr.neigh("replace", dst=gateway, lladdr=gateway_mac, ifindex=index, state=NUD_PERMANENT)


# ----- host side (the agent's own namespace) -------------------------------------------------------------


def prepare(netns_path: str, host_veth: str, service_ip: str, gateway: str, mtu: int | None = None) -> None:
    """Make (or repair) the container namespace, the veth pair and the container's addressing. Idempotent.

    `mtu` (the uplink's) is set on both ends, so the container never sends what the uplink must fragment.
    """
    # From the start, not only once published: a migration target's restored copy sends what its
    # sockets had queued as soon as CRIU restores them, and unforwarded it would wait for its
    # retransmission timer (1 s, doubling) instead of reaching its clients.
    _write_sysctl("ipv4/ip_forward", "1")
    if not nsutil.is_netns_mount(netns_path):
        nsutil.remove_netns(netns_path)  # a stale file from a crash would make the create fail
        nsutil.create_netns(netns_path)
    eth0 = nsutil.call_in_netns(netns_path, _container_eth0)
    with IPRoute() as ipr:
        host = _index(ipr, host_veth)
        if host is not None:
            link = _link(ipr, host)
            paired = _is_veth(link) and eth0 is not None and _peer_index(link) == eth0[0] and eth0[1] == host
            if not paired:
                ipr.link("del", index=host)
                host = None
        if host is None:
            if eth0 is not None:
                nsutil.call_in_netns(netns_path, _delete_container_eth0)
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # The peer is created directly in the container namespace: no eth0 ever appears here.
                ipr.link(
                    "add",
                    ifname=host_veth,
                    kind="veth",
                    peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": fd},
                )
            finally:
                os.close(fd)
            host = _index(ipr, host_veth)
            if host is None:
                raise OSError(errno.ENODEV, f"veth {host_veth} was not created")
        # proxy_arp on the host end answers the container's ARP for the link-local gateway (Calico's
        # trick); proxy_delay 0 because the default delays proxied replies by up to 0.8 s.
        _write_sysctl(f"ipv4/conf/{host_veth}/proxy_arp", "1")
        _write_sysctl(f"ipv4/neigh/{host_veth}/proxy_delay", "0")
        if mtu is not None:
            ipr.link("set", index=host, mtu=mtu)
        ipr.link("set", index=host, state="up")
        mac = _mac(_link(ipr, host))
    nsutil.call_in_netns(netns_path, lambda: _configure_container(service_ip, gateway, mac, mtu))


def destroy(netns_path: str, host_veth: str) -> None:
    """Remove the veth pair and any hold device (with the routes through them) and the namespace
    name. Idempotent."""
    with IPRoute() as ipr:
        _delete_link(ipr, host_veth)
        _delete_link(ipr, hold_ifname(host_veth))
    if nsutil.is_netns_mount(netns_path):
        # The host end may be gone already (namespace recreated by hand): drop the container end too.
        nsutil.call_in_netns(netns_path, _delete_container_eth0)
    nsutil.remove_netns(netns_path)


def link_mtu(ifname: str) -> int | None:
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        return int(_link(ipr, index).get_attr("IFLA_MTU")) if index is not None else None


def packets_sent(ifnames: set[str]) -> dict[str, int]:
    """The packets each of `ifnames` has sent (IFLA_STATS64 tx_packets), from one link dump; names
    that do not exist here are left out. Sent by a container's host veth is received by the
    container: every packet routed into it, whatever its protocol."""
    out: dict[str, int] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            stats = link.get_attr("IFLA_STATS64") if name in ifnames else None
            if stats is not None:
                out[str(name)] = int(stats["tx_packets"])
    return out


def default_route_interface() -> str | None:
    """The interface of the IPv4 main-table default route with the lowest metric, if any."""
    best: tuple[int, int] | None = None
    with IPRoute() as ipr:
        for route in ipr.route("dump", family=socket.AF_INET, table=RT_TABLE_MAIN):
            if route["dst_len"] != 0 or route.get_attr("RTA_TABLE", RT_TABLE_MAIN) != RT_TABLE_MAIN:
                continue
            oif = route.get_attr("RTA_OIF")
            if oif is None:
                hops = route.get_attr("RTA_MULTIPATH") or []
                oif = hops[0]["oif"] if hops else None
            if oif is None:
                continue
            metric = route.get_attr("RTA_PRIORITY") or 0
            if best is None or metric < best[0]:
                best = (metric, int(oif))
        if best is None:
            return None
        return str(_link(ipr, best[1]).get_attr("IFLA_IFNAME"))


def publish(service_ip: str, host_veth: str, uplink: str) -> None:
    """Route service_ip/32 to the host veth and let the uplink answer ARP for it (not the announcement).

    The uplink answers through proxy ARP limited to this one address (a proxy neighbour entry, `ip
    neigh add proxy`): the same answers as the uplink's proxy_arp sysctl would give for the published
    /32s, without also answering for every other address routed through another interface. Either
    way the kernel answers only while the /32 route exists, so the route is the switch.
    """
    _write_sysctl("ipv4/ip_forward", "1")
    _write_sysctl(f"ipv4/neigh/{uplink}/proxy_delay", "0")  # else broadcasts are answered up to 0.8 s late
    with IPRoute() as ipr:
        up = _index(ipr, uplink)
        if up is None:
            raise OSError(errno.ENODEV, f"no uplink interface {uplink}")
        _route_to_veth(ipr, service_ip, host_veth)
        _delete_link(ipr, hold_ifname(host_veth))  # held here until now
        ipr.neigh("replace", dst=service_ip, ifindex=up, flags=NTF_PROXY)


def _route_to_veth(ipr: IPRoute, service_ip: str, host_veth: str) -> None:
    """Our /32 for service_ip, through host_veth (replacing whatever route of ours was there). The veth
    comes up first: a held address had it down (see `hold`)."""
    index = _index(ipr, host_veth)
    if index is None:
        raise OSError(errno.ENODEV, f"no interface {host_veth}: prepare the container's network first")
    ipr.link("set", index=index, state="up")
    ipr.route(
        "replace",
        dst=f"{service_ip}/32",
        oif=index,
        scope=RT_SCOPE_LINK,
        proto=RTPROT_FERRYMAN,
        table=RT_TABLE_MAIN,
    )


def hold(service_ip: str, host_veth: str, capture: str | None = None) -> bool:
    """Take the container's incoming traffic away: service_ip/32 routed into the hold device
    `capture` (a TUN device whose packets the agent keeps, see `capture.HeldTraffic`), or a
    blackhole without one, in place of the route to host_veth.

    The container's kernel must not take in what its frozen copy will never see: once CRIU has read
    a socket, data the kernel acknowledged after that is lost to the restored copy (CRIU unlocks the
    network at the end of a dump that leaves the tasks alive), and a connection its kernel completes
    but the workload has not accepted yet is not dumped at all (CRIU skips connections in flight):
    its client, acknowledged, would wait for good. Kept aside instead, what clients send is sent
    again to whichever copy then holds the address. The proxy ARP entry stays: neighbours keep
    sending here, so nothing takes another path meanwhile. What the container sends still leaves
    until `silence`.
    False when the address was not routed to host_veth (nothing is changed then).
    """
    if published_routes().get(service_ip) != host_veth:
        return False
    with IPRoute() as ipr:
        device = _index(ipr, capture) if capture else None
        if device is not None:
            with contextlib.suppress(OSError):  # no IPv6 chatter of its own (absent without IPv6)
                _write_sysctl(f"ipv6/conf/{capture}/disable_ipv6", "1")
            ipr.link("set", index=device, state="up")
            route: dict[str, Any] = {"oif": device, "scope": RT_SCOPE_LINK}
        else:
            route = {"type": RTN_BLACKHOLE}
        ipr.route("replace", dst=f"{service_ip}/32", proto=RTPROT_FERRYMAN, table=RT_TABLE_MAIN, **route)
    return True


def silence(host_veth: str) -> None:
    """Take host_veth down: the container's eth0 loses carrier, and whatever its kernel sends is
    dropped at its own interface.

    A frozen task's kernel still runs its TCP timers. Its retransmissions and window probes carry
    timestamps ahead of the restored copy's, and a client that takes them discards the restored
    copy's replies (PAWS) for as long as they come. Publishing the address again (`release`,
    `publish`) brings the veth up.
    """
    with IPRoute() as ipr:
        index = _index(ipr, host_veth)
        if index is not None:
            ipr.link("set", index=index, state="down")


def release(service_ip: str, host_veth: str) -> bool:
    """Undo `hold`: route service_ip to host_veth again, delete the hold device. False when it was
    not held here."""
    if published_routes().get(service_ip) != HELD:
        return False
    with IPRoute() as ipr:
        _route_to_veth(ipr, service_ip, host_veth)
        _delete_link(ipr, hold_ifname(host_veth))
    return True


def delete_link(ifname: str) -> None:
    """Delete the interface `ifname` (with the routes through it), if it exists."""
    with IPRoute() as ipr:
        _delete_link(ipr, ifname)


def _delete_link(ipr: IPRoute, ifname: str) -> None:
    index = _index(ipr, ifname)
    if index is None:
        return
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise


def unpublish(service_ip: str, uplink: str | None) -> bool:
    """Remove our /32 route for service_ip (and the uplink's proxy entry, and a hold device); False
    when there was no route."""
    device = _route_interfaces().get(service_ip, "")
    with IPRoute() as ipr:
        removed = True
        try:
            # Scope "nowhere" matches any scope, as `ip route del` does (pyroute2 would send universe).
            ipr.route("del", dst=f"{service_ip}/32", proto=RTPROT_FERRYMAN, table=RT_TABLE_MAIN, scope=RT_SCOPE_NOWHERE)
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:
                raise
            removed = False
        if device.startswith(HOLD_PREFIX):
            _delete_link(ipr, device)
        up = _index(ipr, uplink) if uplink else None
        if up is not None:
            try:
                ipr.neigh("del", dst=service_ip, ifindex=up, flags=NTF_PROXY)
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:
                    raise
    return removed


def published_interface(service_ip: str) -> str | None:
    """The interface our /32 route for service_ip points at, or None when it is not published here."""
    return published_routes().get(service_ip)


def published_routes() -> dict[str, str]:
    """{service IP: interface} for every route of ours in this namespace (HELD for a held address)."""
    return {ip: HELD if name.startswith(HOLD_PREFIX) else name for ip, name in _route_interfaces().items()}


def _route_interfaces() -> dict[str, str]:
    """{service IP: the interface of our route to it ("" for a blackhole)}."""
    out: dict[str, str] = {}
    with IPRoute() as ipr:
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for route in ipr.route("dump", family=socket.AF_INET, table=RT_TABLE_MAIN):
            if route["proto"] == RTPROT_FERRYMAN and route["dst_len"] == 32:
                oif = route.get_attr("RTA_OIF")
                out[str(route.get_attr("RTA_DST"))] = names.get(int(oif), "") if oif is not None else ""
    return out


def no_redirects(uplink: str) -> None:
    """Stop ICMP redirects out of the uplink: a host balancing a service address forwards a client's
    packets back out of the interface they came in on (to a replica on another host), and a redirect
    would teach the client to bypass the balancer."""
    _write_sysctl("ipv4/conf/all/send_redirects", "0")
    _write_sysctl(f"ipv4/conf/{uplink}/send_redirects", "0")
