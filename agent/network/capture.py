"""What clients send to a held service address, kept and later delivered to the copy that holds it.

While a migration's source copy is frozen, the service address is routed into a TUN device of the
agent (see `netlink.hold`) instead of being dropped. Every IPv4 packet for the address is read
here and kept, up to a byte budget. Once the address is published again (on the target after a
commit, or here after a rollback) the kept packets are sent to it again from this host: the
restored copy receives the requests its clients sent during the freeze and acknowledges them at
once. Without that a client whose segments were dropped waits for its next retransmission, and
its retransmission timer doubled on every try while the copy was frozen (0.2, 0.6, 1.4, 3.0 s...).

The device is persistent, so it outlives the agent: if the agent dies while holding, the route
still points into it and the kernel drops what queues there (a hold, as with a blackhole route),
until `release`, `publish`, `unpublish` or `destroy` deletes the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
READ_SIZE = 65536
DEFAULT_BUDGET = 4 * 1024 * 1024
"""Bytes of packets kept per held address: a few thousand full-size segments. Beyond it new packets
are counted and dropped (their senders retransmit, as without capture)."""


class HeldTraffic:
    """One held address's TUN device (attached, persistent) and the packets read from it."""

    def __init__(self, service_ip: str, ifname: str, fd: int, budget: int = DEFAULT_BUDGET) -> None:
        self.service_ip = service_ip
        self.ifname = ifname
        self._fd: int | None = fd
        self._dst = ipaddress.IPv4Address(service_ip).packed
        self._budget = budget
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self.dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def create(cls, service_ip: str, ifname: str, budget: int = DEFAULT_BUDGET) -> HeldTraffic:
        """Create (or attach to) the persistent TUN device `ifname`. Blocking; raises OSError."""
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI))
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except OSError:
            os.close(fd)
            raise
        return cls(service_ip, ifname, fd, budget)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read packets as they arrive, on `loop`."""
        assert self._fd is not None, "closed"
        self._loop = loop
        loop.add_reader(self._fd, self._read_available)

    def _read_available(self) -> None:
        while self._fd is not None:
            try:
                packet = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("reading held traffic failed", extra={"service_ip": self.service_ip, "error": str(exc)})
                self._stop_reading()
                return
            if not packet:  # the device is gone
                self._stop_reading()
                return
            self._keep(packet)

    def _keep(self, packet: bytes) -> None:
        if not is_ipv4_to(packet, self._dst):
            return  # the device's own chatter, or another address
        if self._kept_bytes + len(packet) > self._budget:
            self.dropped += 1
            return
        self._kept.append(packet)
        self._kept_bytes += len(packet)

    def _stop_reading(self) -> None:
        if self._loop is not None and self._fd is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        self._loop = None

    def take(self) -> list[bytes]:
        """Stop reading, read what is still queued; the kept packets, oldest first. Must run on the
        loop that `start`ed it (or without one)."""
        self._stop_reading()
        self._read_available()
        kept, self._kept, self._kept_bytes = self._kept, [], 0
        return kept

    def close(self) -> None:
        """Close the descriptor. The device stays (persistent) until netlink deletes it with the
        route change that ends the hold: closing first would take the route with it."""
        self._stop_reading()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def is_ipv4_to(packet: bytes, dst: bytes) -> bool:
    """True for an IPv4 packet whose destination address is `dst` (4 bytes)."""
    return len(packet) >= 20 and packet[0] >> 4 == 4 and packet[16:20] == dst


def send_packets(packets: Iterable[bytes]) -> int:
    """Send whole IPv4 packets (their own headers, the clients' source addresses) from this network
    namespace, routed by destination as any packet leaving this host. Blocking. The number sent."""
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for packet in packets:
            dst = socket.inet_ntoa(packet[16:20])
            try:
                raw.sendto(packet, (dst, 0))
            except OSError as exc:
                if exc.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                continue  # this one is lost: its sender retransmits, as without capture
            sent += 1
    return sent
