"""Service addresses and the names derived from a container key: pure functions, no system calls."""

from __future__ import annotations

import hashlib
import ipaddress

from core.errors import InvalidRequest

NETNS_PREFIX = "fm-"
HOST_VETH_PREFIX = "fmv"
HOLD_PREFIX = "fmh"
"""The TUN device a held address is routed into (see `capture`): "fmh" + the host veth's hash."""
CONTAINER_IFNAME = "eth0"
HASH_LEN = 10
"""Hex digits of the key hash in names: "fmv" + 10 fits IFNAMSIZ (15) with room to spare."""


def parse_service_ip(value: str) -> str:
    """The canonical text of a service address, or InvalidRequest.

    A service address is a single routable IPv4 host address (it becomes a /32 route and is
    announced by ARP): loopback, link-local, multicast, broadcast and unspecified are refused.
    """
    try:
        addr = ipaddress.IPv4Address(value.strip())
    except ValueError:
        raise InvalidRequest(f"service_ip: {value!r} is not an IPv4 address") from None
    bad = (
        addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_unspecified
        or addr.is_reserved  # 240/4, which includes the limited broadcast address
    )
    if bad:
        raise InvalidRequest(f"service_ip: {addr} cannot be a service address (not a unicast host address)")
    return str(addr)


def key_hash(scope: str, container_key: str) -> str:
    """A short stable hash naming one container's network objects within `scope` (host + namespace)."""
    return hashlib.sha256(f"{scope}\0{container_key}".encode()).hexdigest()[:HASH_LEN]


def netns_name(scope: str, container_key: str) -> str:
    return NETNS_PREFIX + key_hash(scope, container_key)


def host_veth_name(scope: str, container_key: str) -> str:
    return HOST_VETH_PREFIX + key_hash(scope, container_key)


def hold_ifname(host_veth: str) -> str:
    """The hold device's name for the container behind `host_veth`."""
    return HOLD_PREFIX + host_veth.removeprefix(HOST_VETH_PREFIX)
