"""Service addresses for deployments' components, from the configured pool. Pure.

`[deployments] address_pool` is a CIDR block on the hosts' segment (the agents publish a service
address with a route and gratuitous ARP, docs/migration.md). Each component takes one address for
the life of its deployment; a deployment gives them back when it is FAILED or REMOVED.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping

from core.errors import ConfigError, Conflict


class AddressesExhausted(Conflict):
    code = "deployment_addresses_exhausted"


def parse_pool(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The pool, or None when empty; ConfigError for a bad block."""
    if not text:
        return None
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"deployments.address_pool: {exc}") from exc


def allocate(pool: str, taken: Collection[str], count: int, released: Mapping[str, float] | None = None) -> list[str]:
    """`count` addresses of `pool` not in `taken`: those never released first, lowest first, then
    those `released` (address -> when) longest ago; AddressesExhausted if there are fewer.

    A just-released address is taken last because the hosts that talked to it may still hold an
    ARP entry pointing it at the host it was on: the first packets to it on another host wait for
    that entry to be found stale (about a second: bench/deploy.py's last level took 1.2 s instead
    of 0.4 s when the lowest free address was always reused)."""
    network = parse_pool(pool)
    if network is None:
        raise AddressesExhausted("no [deployments] address_pool is configured: components need service addresses")
    used = set(taken)
    when = released or {}
    out: list[str] = []
    for address in network.hosts():  # lazily: a pool may be an IPv6 /64
        text = str(address)
        if text not in used and text not in when:
            out.append(text)
            if len(out) == count:
                return out
    again = sorted((a for a in when if a not in used and ipaddress.ip_address(a) in network), key=lambda a: when[a])
    out += again[: count - len(out)]
    if len(out) == count:
        return out
    raise AddressesExhausted(
        f"the address pool {pool} has {len(out)} free address(es), the deployment needs {count}; "
        "undeploy something or widen [deployments] address_pool"
    )
