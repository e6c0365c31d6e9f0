"""Gratuitous ARP: tell the segment that an address now lives behind this host's MAC.

pyroute2 has no ARP sender, so the frames are built here (42 bytes of Ethernet + ARP, padded to the
60-byte Ethernet minimum) and written to an AF_PACKET socket bound to the uplink.

Linux receivers update an existing neighbour entry from a gratuitous ARP at once (it overrides the
1 s `locktime`), as a request (RFC 5227 announcement: target MAC zero) or as a reply whose target MAC
equals the sender's; both are sent because other stacks honour one or the other.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST = b"\xff" * 6
ETH_MIN_FRAME = 60  # without the FCS
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")


def garp_frame(mac: bytes, ip: str, op: int = ARPOP_REQUEST) -> bytes:
    """A broadcast gratuitous ARP frame announcing `ip` at `mac` (sender IP == target IP)."""
    if len(mac) != 6:
        raise ValueError(f"expected a 6-byte MAC, got {len(mac)} bytes")
    if op not in (ARPOP_REQUEST, ARPOP_REPLY):
        raise ValueError(f"ARP op must be request (1) or reply (2), got {op}")
    addr = ipaddress.IPv4Address(ip).packed
    target_mac = b"\x00" * 6 if op == ARPOP_REQUEST else mac
    frame = _ETH.pack(BROADCAST, mac, ETH_P_ARP) + _ARP.pack(
        ARPHRD_ETHER, ETH_P_IP, 6, 4, op, mac, addr, target_mac, addr
    )
    return frame.ljust(ETH_MIN_FRAME, b"\x00")


def parse_arp(frame: bytes) -> tuple[int, bytes, str, bytes, str] | None:
    """(op, sender MAC, sender IP, target MAC, target IP) of an Ethernet ARP frame, else None."""
    if len(frame) < _ETH.size + _ARP.size:
        return None
    _dst, _src, ethertype = _ETH.unpack_from(frame)
    if ethertype != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, _ETH.size)
    if (htype, ptype, hlen, plen) != (ARPHRD_ETHER, ETH_P_IP, 6, 4):
        return None
    return op, sha, str(ipaddress.IPv4Address(spa)), tha, str(ipaddress.IPv4Address(tpa))


def send_garp(ifname: str, ip: str) -> bytes:
    """Send a gratuitous ARP request and reply for `ip` out of `ifname` (blocking, fast).

    Runs in the caller's network namespace; returns the interface MAC the frames announced.
    """
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((ifname, ETH_P_ARP))
        # An AF_PACKET address carries the interface's hardware address: no extra lookup needed.
        mac: bytes = sock.getsockname()[4]
        if len(mac) != 6:
            raise OSError(f"{ifname} is not an Ethernet interface")
        for op in (ARPOP_REQUEST, ARPOP_REPLY):
            sock.send(garp_frame(mac, ip, op))
    return mac
