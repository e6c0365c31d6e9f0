"""Service addresses for deployments' components, from the configured pool. Pure.

`[deployments] address_pool` is a CIDR block on the hosts' segment (the agents publish a service
address with a route and gratuitous ARP, docs/migration.md). Each component takes one address for
the life of its deployment; a deployment gives them back when it is FAILED or REMOVED.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

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


def allocate(pool: str, taken: Collection[str], count: int) -> list[str]:
    """`count` addresses of `pool` not in `taken`, lowest first; AddressesExhausted if there are fewer."""
    network = parse_pool(pool)
    if network is None:
        raise AddressesExhausted("no [deployments] address_pool is configured: components need service addresses")
    used = set(taken)
    out: list[str] = []
    for address in network.hosts():
        text = str(address)
        if text not in used:
            out.append(text)
            if len(out) == count:
                return out
    raise AddressesExhausted(
        f"the address pool {pool} has {len(out)} free address(es), the deployment needs {count}; "
        "undeploy something or widen [deployments] address_pool"
    )
