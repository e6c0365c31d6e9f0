"""Replicas behind one service address: new connections spread in the kernel, established ones kept.

The host that owns a replicated component's service address (where its first replica runs and the
address is published) holds one nftables table per balanced address, `fmlb_<a>_<b>_<c>_<d>`:

    prerouting, output (nat, dstnat)   a new connection to the service address (a TCP SYN, or the
                                       first packet of a UDP flow) is DNATed to
                                       `numgen inc mod N map {0: backend0, ...}`: round robin
    postrouting (nat, srcnat)          one DNATed to a backend on another host (out of the uplink)
                                       is masqueraded, so its replies come back through this host's
                                       conntrack, which turns them back into the service address

The NAT rules are read only for a connection's first packet: conntrack keeps every established
connection on the backend it was given, so replacing the map (one nftables transaction: the table
is deleted and made again) changes where new connections go and nothing else. That is scale in:
the backend leaves the map, its connections are counted from conntrack (`connections`) until none
is open, then it is stopped. Only a SYN is balanced, so a connection that existed before the table
(picked up mid-stream by conntrack) is never moved.

The rules are text for libnftables (Debian's python3-nftables), built by `table_script`, a pure
function of validated addresses; `NftablesBalancer` is the thin adapter that runs them, and the
conntrack dump goes through pyroute2.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, Protocol

from agent.network.addresses import parse_service_ip
from core.errors import InvalidRequest

TABLE_PREFIX = "fmlb_"
MAX_BACKENDS = 64
OPEN_TCP_STATES = frozenset({1, 2, 3, 4, 5, 6, 9})
"""conntrack TCP states that still carry a connection: SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT,
CLOSE_WAIT, LAST_ACK, SYN_SENT2 (TIME_WAIT and CLOSE are over: their sockets are gone)."""


class BalancerError(Exception):
    """libnftables or conntrack refused a step (the adapter's one error)."""


def table_name(service_ip: str) -> str:
    return TABLE_PREFIX + parse_service_ip(service_ip).replace(".", "_")


def check_backends(service_ip: str, backends: Sequence[str]) -> tuple[str, ...]:
    """The canonical backends, in order; InvalidRequest on an empty, oversized or repeated list."""
    parse_service_ip(service_ip)
    if not backends:
        raise InvalidRequest("backends: give at least one address")
    if len(backends) > MAX_BACKENDS:
        raise InvalidRequest(f"backends: at most {MAX_BACKENDS}")
    out = tuple(parse_service_ip(b) for b in backends)
    if len(set(out)) != len(out):
        raise InvalidRequest("backends: an address is listed twice")
    return out


def _check_ifname(name: str) -> str:
    if not name or len(name) > 15 or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidRequest(f"uplink: {name!r} is not an interface name")
    return name


def table_script(service_ip: str, backends: Sequence[str], uplink: str) -> str:
    """The nftables commands that (re)make the table balancing `service_ip` over `backends`: one
    transaction, so no packet ever sees a half-made table."""
    ip = parse_service_ip(service_ip)
    members = check_backends(ip, backends)
    table = table_name(ip)
    spread = "numgen inc mod {} map {{ {} }}".format(
        len(members), ", ".join(f"{i} : {b}" for i, b in enumerate(members))
    )
    rules = (
        f"ip daddr {ip} tcp flags & (fin | syn | rst | ack) == syn counter dnat to {spread}",
        f"ip daddr {ip} meta l4proto udp ct state new counter dnat to {spread}",
    )
    body = "\n".join(f"        {r}" for r in rules)
    return (
        f"table ip {table}\n"
        f"delete table ip {table}\n"
        f"table ip {table} {{\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        f"{body}\n"
        "    }\n"
        "    chain output {\n"
        "        type nat hook output priority -100; policy accept;\n"
        f"{body}\n"
        "    }\n"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        f'        oifname "{_check_ifname(uplink)}" ct original ip daddr {ip} ct status dnat masquerade\n'
        "    }\n"
        "}\n"
    )


def parse_backends(ruleset: dict[str, Any], service_ip: str) -> tuple[str, ...] | None:
    """The backends of `service_ip`'s table in a JSON ruleset (`list table`), in map order; None
    when there is no such table."""
    table = table_name(service_ip)
    for item in ruleset.get("nftables", []):
        rule = item.get("rule")
        if not rule or rule.get("table") != table or rule.get("chain") != "prerouting":
            continue
        for expr in rule.get("expr", []):
            dnat = expr.get("dnat")
            if dnat is None:
                continue
            mapping = dnat.get("addr", {}).get("map", {})
            elements = mapping.get("data", {}).get("set", [])
            return tuple(str(e[1]) for e in sorted(elements, key=lambda e: int(e[0])))
    return None


def parse_balanced(ruleset: dict[str, Any], service_ip: str) -> int:
    """How many connections `service_ip`'s table has spread since it was made: its rules' counters."""
    table = table_name(service_ip)
    total = 0
    for item in ruleset.get("nftables", []):
        rule = item.get("rule")
        if not rule or rule.get("table") != table:
            continue
        for expr in rule.get("expr", []):
            counter = expr.get("counter")
            if isinstance(counter, dict):
                total += int(counter.get("packets", 0))
    return total


class KernelBalancer(Protocol):
    """What the service network needs of the kernel; every method blocks (run it in a thread) and
    raises BalancerError."""

    def apply(self, service_ip: str, backends: Sequence[str], uplink: str) -> None: ...
    def remove(self, service_ip: str) -> bool: ...
    def read(self, service_ip: str) -> tuple[tuple[str, ...], int] | None: ...
    def connections(self, service_ip: str) -> dict[str, int]: ...


class NftablesBalancer:
    """libnftables (rules) and pyroute2's conntrack (counting), in the calling thread's network
    namespace."""

    def _nft(self) -> Any:
        try:
            import nftables  # Debian's python3-nftables, linked into the venv by scripts/setup-host
        except ImportError as exc:
            raise BalancerError(f"libnftables' binding is missing ({exc}): run scripts/setup-host") from exc

        nft = nftables.Nftables()
        nft.set_json_output(True)
        return nft

    def _run(self, script: str) -> str:
        rc, out, err = self._nft().cmd(script)
        if rc != 0:
            raise BalancerError(err.strip() or f"nft exited {rc}")
        return str(out)

    def apply(self, service_ip: str, backends: Sequence[str], uplink: str) -> None:
        self._run(table_script(service_ip, backends, uplink))

    def remove(self, service_ip: str) -> bool:
        if self.read(service_ip) is None:
            return False
        self._run(f"delete table ip {table_name(service_ip)}")
        return True

    def read(self, service_ip: str) -> tuple[tuple[str, ...], int] | None:
        """(backends, connections spread so far), or None when the address is not balanced here."""
        import json

        rc, out, _ = self._nft().cmd(f"list table ip {table_name(service_ip)}")
        if rc != 0:
            return None  # no such table
        ruleset = json.loads(out)
        return parse_backends(ruleset, service_ip) or (), parse_balanced(ruleset, service_ip)

    def connections(self, service_ip: str) -> dict[str, int]:
        """{backend: connections to service_ip it holds that are still open}, from conntrack."""
        from pyroute2 import Conntrack
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        ip = parse_service_ip(service_ip)
        counts: dict[str, int] = {}
        try:
            ct = Conntrack()
            try:
                # Filtered in the kernel (CTA_FILTER, Linux 5.8): pyroute2 decodes each entry in
                # Python, about 0.3 ms, and a host owning a busy address holds thousands (closed
                # connections stay 2 minutes in TIME_WAIT); only this address's are sent.
                for entry in ct.dump_entries(tuple_orig=NFCTAttrTuple(family=socket.AF_INET, daddr=ip)):
                    orig, reply = entry.tuple_orig, entry.tuple_reply
                    if orig.daddr != ip or orig.proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                        continue
                    if orig.proto == socket.IPPROTO_TCP:
                        state = getattr(entry.protoinfo, "state", None)
                        if state not in OPEN_TCP_STATES:
                            continue
                    counts[reply.saddr] = counts.get(reply.saddr, 0) + 1
            finally:
                ct.close()
        except OSError as exc:
            raise BalancerError(f"conntrack dump: {exc}") from exc
        return counts
